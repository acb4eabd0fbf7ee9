"""Write ``spa_compiler/text/glyphs.npz``, the glyphs data-free text pictures are drawn with:
``python -m models.make_glyphs`` (needs Pillow and matplotlib, whose DejaVu fonts are drawn).

Per face (DejaVu Sans, Serif, Sans Mono, Sans Bold, Serif Italic), every printable ASCII
character is drawn at ``SIZE`` pixels by Pillow into its own cell ``[line height, advance + 2
PAD]`` (ascender to descender, the pen at ``PAD``, so overhanging strokes stay in the cell), the
cells side by side in one ``uint8`` strip; ``starts`` gives each cell's first column and
``advances`` how far the pen moves after the character. The DejaVu licence travels with the
glyphs (``LICENSE_DEJAVU.txt``).
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from spa_compiler.rendered_text import CHARACTERS, GLYPHS, PAD

__all__ = ["FACES", "SIZE", "face_glyphs", "main"]

FACES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif-Italic.ttf")
SIZE = 32  # pixels per em


def _font_folder() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


def face_glyphs(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(strip, starts, advances)`` of one font file (see the module docstring)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(path, SIZE)
    ascent, descent = font.getmetrics()
    cells, advances = [], []
    for character in CHARACTERS:
        advance = font.getlength(character)
        cell = Image.new("L", (int(np.ceil(advance)) + 2 * PAD, ascent + descent), 0)
        ImageDraw.Draw(cell).text((PAD, 0), character, fill=255, font=font)
        cells.append(np.asarray(cell))
        advances.append(advance)
    starts = np.concatenate([[0], np.cumsum([c.shape[1] for c in cells])]).astype(np.int32)
    return np.concatenate(cells, axis=1), starts, np.asarray(advances, dtype=np.float32)


def main() -> None:
    folder = _font_folder()
    arrays = {}
    for index, face in enumerate(FACES):
        arrays[f"strip{index}"], arrays[f"starts{index}"], arrays[f"advances{index}"] = face_glyphs(os.path.join(folder, face))
    np.savez_compressed(GLYPHS, **arrays)
    shutil.copyfile(os.path.join(folder, "LICENSE_DEJAVU"), GLYPHS.parent / "LICENSE_DEJAVU.txt")
    print(f"wrote {GLYPHS} ({GLYPHS.stat().st_size} bytes, {len(FACES)} faces)")


if __name__ == "__main__":
    main()
