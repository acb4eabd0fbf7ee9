"""all-MiniLM-L6-v2 as a sentence encoder: how close the pruned embeddings stay to the original ones.

Test sentences are ``models.sentences.SENTENCES`` followed by sentences generated from templates
(seed 0); calibration sentences are ``CALIBRATION`` followed by generated ones (seed 1), none of
them a test sentence.  Sentences are tokenised to ``SEQ_LEN`` tokens and embedded by mean pooling
over the attention mask (``models.sentences.embed``).  Metrics, against the unpruned export:

- **mean cosine**: the mean over test sentences of the cosine similarity between the pruned and
  the original embedding of the same sentence;
- **NN agreement**: the fraction of test sentences whose nearest other test sentence (cosine)
  is the same under the pruned embeddings as under the original ones, i.e. whether retrieval
  gives the same answer;
- **written cosine**: the mean cosine over the test sentences of ``SENTENCES`` only (65 written
  ones on many subjects). The generated sentences come from the same templates as the generated
  calibration sentences, so calibration (and fine-tuning on generated sentences) sees their
  phrasing; the written ones show how the model fares on text unlike its calibration.

Torch-Pruning prunes the PyTorch model with ``models.transformer_benchmark.torch_pruning_minilm``.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import cached_property
from pathlib import Path

import numpy as np

from .real import export_minilm, load_minilm
from .sentences import CALIBRATION, ENCODER_INPUTS, SENTENCES, embed, mean_cosine, tokenize
from .tasks import Shapes, Task

__all__ = ["MiniLMTask", "generate_sentences", "nearest_neighbours"]

SEQ_LEN = 32
"""Tokens per sentence: the longest generated one has 25, two of ``SENTENCES`` are truncated."""
TEST_SEED = 0
CALIBRATION_SEED = 1

_TEMPLATES: tuple[tuple[str, dict[str, tuple[str, ...]]], ...] = (
    ("The {person} {verb} the {thing} {when}.", {
        "person": ("teacher", "mechanic", "nurse", "farmer", "pilot", "chef", "student", "neighbour", "banker", "painter"),
        "verb": ("repaired", "sold", "painted", "forgot", "borrowed", "cleaned", "ordered", "measured", "returned", "found"),
        "thing": ("bicycle", "kettle", "fence", "laptop", "boat", "piano", "roof", "camera", "tractor", "umbrella"),
        "when": ("yesterday", "last week", "this morning", "before lunch", "on Sunday", "after the storm", "in March"),
    }),
    ("How do I {action} a {object} without {tool}?", {
        "action": ("fix", "clean", "open", "replace", "paint", "move", "cut", "charge", "install", "fold"),
        "object": ("leaking tap", "stuck window", "broken zip", "flat tyre", "wooden floor", "phone screen",
                   "garden hose", "heavy sofa", "car battery", "tent"),
        "tool": ("a ladder", "special tools", "any glue", "a drill", "help", "electricity", "a manual"),
    }),
    ("{team} {result} {score} against {rival} in the {round}.", {
        "team": ("The visitors", "Our local club", "The national side", "The underdogs", "The champions", "The youth team"),
        "result": ("won", "lost", "drew", "came back to win", "narrowly lost"),
        "score": ("two to one", "three to nil", "one all", "four to two", "by a single goal"),
        "rival": ("their oldest rivals", "the league leaders", "a team from the north", "the home side"),
        "round": ("final", "semi-final", "opening match", "second round", "last game of the season"),
    }),
    ("Prices of {good} {move} by {amount} percent {period} because of {cause}.", {
        "good": ("coffee", "rice", "petrol", "electricity", "houses", "steel", "cotton", "wheat", "airline tickets"),
        "move": ("rose", "fell", "jumped", "dropped", "climbed"),
        "amount": ("two", "five", "eight", "twelve", "twenty", "thirty"),
        "period": ("this year", "last month", "over the summer", "in a single week", "since January"),
        "cause": ("a poor harvest", "higher demand", "new taxes", "a strike at the ports", "a stronger currency",
                  "cheaper imports"),
    }),
    ("{weather} is expected in {place} {when}, so {advice}.", {
        "weather": ("Heavy snow", "Thick fog", "A heatwave", "Strong wind", "Freezing rain", "A thunderstorm", "Sunshine"),
        "place": ("the mountains", "the capital", "coastal towns", "the south", "the valley", "the islands"),
        "when": ("tonight", "tomorrow", "at the weekend", "on Friday", "later this week"),
        "advice": ("drive carefully", "stay indoors", "bring a coat", "drink plenty of water", "check the trains",
                   "enjoy the day"),
    }),
    ("Scientists found that {subject} {finding} {condition}.", {
        "subject": ("honey bees", "deep-sea fish", "young children", "old trees", "certain bacteria", "migrating birds",
                    "coral reefs", "desert plants"),
        "finding": ("sleep less", "grow faster", "communicate by sound", "remember colours", "survive longer",
                    "change their behaviour", "store more water"),
        "condition": ("in warmer water", "when food is scarce", "at high altitude", "during long winters",
                      "near busy roads", "in complete darkness"),
    }),
    ("Mix the {ingredient} with {other} and {method} it for {minutes} minutes.", {
        "ingredient": ("flour", "rice", "chopped onion", "minced garlic", "grated cheese", "butter", "sliced apples"),
        "other": ("warm milk", "olive oil", "two eggs", "a little sugar", "fresh herbs", "lemon juice"),
        "method": ("bake", "simmer", "fry", "roast", "steam", "stir"),
        "minutes": ("five", "ten", "fifteen", "twenty", "thirty", "forty"),
    }),
    ("Our {transport} to {city} was {state} {reason}.", {
        "transport": ("train", "flight", "bus", "ferry", "taxi", "night coach"),
        "city": ("Lisbon", "Oslo", "Prague", "Nairobi", "Kyoto", "Lima", "Toronto", "Vienna"),
        "state": ("cancelled", "delayed by an hour", "full", "surprisingly cheap", "very comfortable", "late again"),
        "reason": ("because of a strike", "due to the weather", "after a technical fault", "as usual",
                   "during the holidays"),
    }),
)


def generate_sentences(count: int, seed: int, exclude: Collection[str] = ()) -> list[str]:
    """``count`` distinct sentences filled in from the templates, cycling through the topics,
    none in ``exclude``; the same arguments give the same list."""
    rng = np.random.default_rng(seed)
    sentences: list[str] = []
    taken = set(exclude)
    attempt = 0
    while len(sentences) < count:
        template, slots = _TEMPLATES[attempt % len(_TEMPLATES)]
        attempt += 1
        sentence = template.format(**{name: words[int(rng.integers(len(words)))] for name, words in slots.items()})
        if sentence not in taken:
            taken.add(sentence)
            sentences.append(sentence)
    return sentences


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """For each row, the index of the most cosine-similar other row."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


class MiniLMTask(Task):
    name = "minilm"
    metric_names = ("mean cosine", "NN agreement", "written cosine")
    default_test_samples = 300
    round_to = 16
    torch_pruning = True
    attention = tokens = True

    @property
    def description(self) -> str:
        return f"all-MiniLM-L6-v2, {self.test_samples} sentences at {SEQ_LEN} tokens, pruned vs original embeddings"

    @cached_property
    def tokenizer(self):
        return load_minilm()[0]

    @cached_property
    def test_sentences(self) -> list[str]:
        base = list(SENTENCES[: self.test_samples])
        return base + generate_sentences(self.test_samples - len(base), TEST_SEED, exclude=base)

    def calibration_sentences(self, samples: int) -> list[str]:
        base = list(CALIBRATION[:samples])
        return base + generate_sentences(samples - len(base), CALIBRATION_SEED, exclude={*base, *self.test_sentences})

    @cached_property
    def test_inputs(self) -> dict[str, np.ndarray]:
        return tokenize(self.tokenizer, self.test_sentences, SEQ_LEN)

    def calibration_inputs(self, samples: int) -> dict[str, np.ndarray]:
        return tokenize(self.tokenizer, self.calibration_sentences(samples), SEQ_LEN)

    @cached_property
    def _source(self) -> Path:
        return export_minilm(self.folder / "minilm.onnx", SEQ_LEN)

    def source(self) -> tuple[Path, Shapes]:
        return self._source, {name: (1, SEQ_LEN) for name in ENCODER_INPUTS}

    @cached_property
    def reference(self) -> np.ndarray:
        """The original model's test embeddings."""
        return embed(self._source, self.test_inputs)

    def metrics(self, path: str | Path) -> dict[str, float]:
        pruned = embed(path, self.test_inputs)
        agreement = nearest_neighbours(pruned) == nearest_neighbours(self.reference)
        written = min(len(SENTENCES), self.test_samples)
        return {"mean cosine": mean_cosine(self.reference, pruned), "NN agreement": float(agreement.mean()),
                "written cosine": mean_cosine(self.reference[:written], pruned[:written])}

    def torch_prune(self, ratio: float, output: Path) -> Path:
        import torch

        from .transformer_benchmark import torch_pruning_minilm

        example = {name: torch.from_numpy(array[:1]) for name, array in self.test_inputs.items()}
        return export_minilm(output, SEQ_LEN, encoder=torch_pruning_minilm(ratio, example))
