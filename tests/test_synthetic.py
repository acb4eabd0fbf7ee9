"""Data-free calibration inputs: the modality read from the graph, the image range fitted to the
first BatchNorm, token ids inside the embedding table, determinism, dtypes and shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa_compiler import synthetic
from spa_compiler.ir import load_model
from spa_compiler.synthetic import MAX_PAN, image_content, picture_values, synthetic_calibration, waveform_values

SAMPLES = 24
TRUE_MEAN, TRUE_STD = 0.45, 0.25  # the "training" images are (z - 0.45) / 0.25


def _save(tmp_path, nodes, inputs, outputs, initializers, name="model.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _conv(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """3x3 convolution with padding 1, stride 1: ``[n, c, h, w] -> [n, k, h, w]``."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    return np.einsum("nchwuv,kcuv->nkhw", windows, weight)


def _image_model(tmp_path, batchnorm: bool):
    """x [1, 3, 32, 32] -> Conv 3x3 (8) [-> BatchNorm with the statistics of (z - 0.45) / 0.25
    on natural pictures] -> Relu -> Conv 1x1 (4)."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    weight[:, :, 1, 1] += 1.0  # filters with a mean response, as trained first layers have
    head = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    truth = (image_content(np.random.default_rng(9), 32, 3, 32, 32, 0.0) - TRUE_MEAN) / TRUE_STD
    response = _conv(truth.astype(np.float64), weight.astype(np.float64))
    stats = {
        "gamma": rng.uniform(0.5, 1.5, 8), "beta": rng.uniform(-0.5, 0.5, 8),
        "mean": response.mean(axis=(0, 2, 3)), "var": response.var(axis=(0, 2, 3)),
    }
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv")]
    if batchnorm:
        nodes.append(helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"))
    nodes += [helper.make_node("Relu", ["b" if batchnorm else "c"], ["r"]), helper.make_node("Conv", ["r", "head"], ["y"])]
    initializers = {"w": weight, "head": head, **({k: v.astype(np.float32) for k, v in stats.items()} if batchnorm else {})}
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 32, 32])], initializers)
    return load_model(path), weight, stats


def test_image_range_matches_first_batchnorm(tmp_path):
    graph, weight, stats = _image_model(tmp_path, batchnorm=True)
    arrays, description = synthetic_calibration(graph, SAMPLES, seed=0)
    x = arrays["x"]
    assert x.shape == (SAMPLES, 3, 32, 32) and x.dtype == np.float32
    assert "fitted to BatchNorm 'bn' after Conv 'conv'" in description
    assert "; content and polarity matching 1 BatchNorm layers best" in description  # a square picture: any content
    importance = stats["gamma"] ** 2 / np.sum(stats["gamma"] ** 2)

    def mismatch(images: np.ndarray) -> tuple[float, float]:
        """The γ²-weighted mean over channels of |mean - μ| / σ and |log(var / σ²)| of the
        BatchNorm input on ``images``."""
        response = _conv(images.astype(np.float64), weight.astype(np.float64))
        mean, var = response.mean(axis=(0, 2, 3)), response.var(axis=(0, 2, 3))
        return (float(np.sum(importance * np.abs(mean - stats["mean"]) / np.sqrt(stats["var"]))),
                float(np.sum(importance * np.abs(np.log(var / stats["var"])))))

    mean_error, variance_error = mismatch(x)
    assert mean_error < 0.1 and variance_error < 0.25
    # standard normal inputs miss by more than three times as much
    assert sum(mismatch(np.random.default_rng(0).standard_normal(x.shape))) > 3 * (mean_error + variance_error)


def test_image_without_batchnorm_is_standardised(tmp_path):
    graph, _, _ = _image_model(tmp_path, batchnorm=False)
    arrays, description = synthetic_calibration(graph, SAMPLES, seed=0)
    x = arrays["x"].astype(np.float64)
    assert abs(x.mean()) < 1e-3 and abs(x.std() - 1) < 1e-3
    assert "standardised to zero mean and unit variance (a default: no BatchNorm to fit)" in description
    # half the pictures inverted: dark and light backgrounds both present
    medians = np.median(x.reshape(SAMPLES, -1), axis=1)
    assert (medians > 0.5).sum() >= SAMPLES // 4 and (medians < -0.5).sum() >= SAMPLES // 4


@pytest.mark.parametrize("height, width, share, drawn", [(32, 128, 1.0, "text pictures"),
                                                         (32, 64, 0.5, "natural and text pictures")])
def test_a_text_line_without_batchnorm_gets_text_alone(tmp_path, monkeypatch, height, width, share, drawn):
    """Without a BatchNorm to choose the content, a picture three or more times as wide as tall
    (a text-line crop) is all text; any other half natural, half text."""
    shares, drawing = [], synthetic.image_content

    def recording(rng, n, channels, h, w, text_share):
        shares.append(text_share)
        return drawing(rng, n, channels, h, w, text_share)

    monkeypatch.setattr(synthetic, "image_content", recording, raising=True)
    weight = np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32)
    path = _save(tmp_path, [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, height, width])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, height, width])], {"w": weight})
    arrays, description = synthetic_calibration(load_model(path), 8, seed=0)
    assert shares == [share] and arrays["x"].shape == (8, 1, height, width)
    assert f"'x': 8 {drawn}, half inverted, standardised" in description
    assert ("text alone: shaped like a text line (128x32)" in description) is (share == 1.0)



@pytest.mark.parametrize("batchnorm", [True, False])
def test_8_bit_pixels_are_pictures_in_0_to_255(tmp_path, batchnorm):
    """A uint8 image input (the model casts and normalises it itself) gets the synthetic pictures
    as raw pixel values, ``round(255 z)``, not zeros; with a BatchNorm after the model's own
    normalisation the content and polarity chosen bring its input statistics near the recorded
    ones, as for a float input."""
    float_model, weight, stats = _image_model(tmp_path, batchnorm)
    front = [helper.make_node("Cast", ["pixels"], ["p"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["p", "mean255"], ["centred"]),
             helper.make_node("Div", ["centred", "std255"], ["x"])]
    model = float_model.model
    inputs = [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [1, 3, 32, 32])]
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    initializers.update(mean255=np.array(255 * TRUE_MEAN, np.float32), std255=np.array(255 * TRUE_STD, np.float32))
    path = _save(tmp_path, front + list(model.graph.node), inputs, list(model.graph.output), initializers, "u8.onnx")
    arrays, description = synthetic_calibration(load_model(path), SAMPLES, seed=0)
    pixels = arrays["pixels"]
    assert pixels.dtype == np.uint8 and pixels.shape == (SAMPLES, 3, 32, 32)
    assert pixels.min() <= 20 and pixels.max() >= 235 and len(np.unique(pixels)) > 200
    assert "as 8-bit pixel values 0 to 255 (the input's type; the model scales them)" in description
    from spa_compiler.verify import verification_inputs

    feeds, source = verification_inputs(load_model(path), seed=0)  # the first fidelity figure's inputs
    assert source == "synthetic inputs (8-bit values uniform over 0 to 255)"
    assert feeds["pixels"].dtype == np.uint8 and len(np.unique(feeds["pixels"])) == 256
    if not batchnorm:
        assert "'pixels': 24 natural and text pictures, half inverted, as 8-bit pixel values" in description
        return
    # the recorded statistics are of natural pictures: that content, as drawn, is chosen
    assert "'pixels': 24 natural pictures (as drawn), x = 255 z +0, as 8-bit" in description
    importance = stats["gamma"] ** 2 / np.sum(stats["gamma"] ** 2)

    def mean_error(images: np.ndarray) -> float:
        """The γ²-weighted mean over channels of |mean - μ| / σ of the BatchNorm input."""
        response = _conv((images / 255.0 - TRUE_MEAN) / TRUE_STD, weight.astype(np.float64))
        return float(np.sum(importance * np.abs(response.mean(axis=(0, 2, 3)) - stats["mean"]) / np.sqrt(stats["var"])))

    response = _conv((pixels / 255.0 - TRUE_MEAN) / TRUE_STD, weight.astype(np.float64))
    variance_error = np.sum(importance * np.abs(np.log(response.var(axis=(0, 2, 3)) / stats["var"])))
    # measured 0.107 and 0.055; all-zero pixels, the samples before, miss the means by 2.11
    assert mean_error(pixels) < 0.2 and variance_error < 0.25
    assert mean_error(np.zeros_like(pixels)) > 10 * mean_error(pixels)


def test_a_text_line_with_batchnorm_chooses_only_the_polarity_of_text(tmp_path):
    """A text-line crop's candidates are text alone: the BatchNorm fit picks its polarity and range."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    stats = {"gamma": np.ones(4), "beta": np.zeros(4), "mean": rng.uniform(-1, 1, 4), "var": rng.uniform(0.5, 2, 4)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 64])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 64])],
                 {"w": weight, **{k: v.astype(np.float32) for k, v in stats.items()}})
    arrays, description = synthetic_calibration(load_model(path), 8, seed=0)
    assert arrays["x"].shape == (8, 3, 16, 64)
    assert "'x': 8 text pictures (" in description and "; text alone: shaped like a text line (64x16)" in description
    assert "; polarity matching 1 BatchNorm layers best" in description


def _shift_between(before: np.ndarray, after: np.ndarray) -> int:
    """The ``d`` in 0..MAX_PAN for which ``after`` is ``before`` moved ``d`` pixels left (exactly,
    over the columns both show), else -1; frames are ``[..., H, W]``."""
    width = before.shape[-1]
    for d in range(MAX_PAN + 1):
        if np.array_equal(after[..., : width - d], before[..., d:]):
            return d
    return -1


@pytest.mark.parametrize("layout", ["NCDHW", "NDHWC"])
def test_frames_pan_across_one_picture(tmp_path, layout):
    """A rank-5 input with three colours, channels first or last, gets clips: frame ``t + 1`` is
    frame ``t`` with the window moved 0 to ``MAX_PAN`` pixels, at a speed that varies by clip."""
    shape = [1, 3, 5, 24, 32] if layout == "NCDHW" else [1, 5, 24, 32, 3]
    nodes = [helper.make_node("Relu", ["video"], ["y"]), helper.make_node("Relu", ["volume"], ["z"])]
    inputs = [helper.make_tensor_value_info("video", TensorProto.FLOAT, shape),
              helper.make_tensor_value_info("volume", TensorProto.FLOAT, [1, 8, 2, 4, 4])]  # sides < 8: not pictures
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape),
               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 2, 4, 4])]
    graph = load_model(_save(tmp_path, nodes, inputs, outputs, {}))
    arrays, description = synthetic_calibration(graph, 12, seed=0)
    video = arrays["video"]
    assert video.shape == (12, *shape[1:]) and video.dtype == np.float32
    clips = video if layout == "NCDHW" else np.moveaxis(video, -1, 1)  # [n, C, D, H, W]
    shifts = np.array([[_shift_between(clip[:, t], clip[:, t + 1]) for t in range(4)] for clip in clips])
    assert (shifts >= 0).all() and (shifts > 0).any() and len({tuple(row) for row in shifts}) > 3
    assert abs(video.mean()) < 1e-3 and abs(video.std() - 1) < 1e-3
    assert "'video': 12 natural and text 5-frame panning clips" in description
    assert "'volume': standard normal" in description
    assert picture_values(graph) == 3 * 5 * 24 * 32


def test_one_frame_for_a_3d_convolution(tmp_path):
    """``[N, 3, 1, H, W]`` (a 3-D convolution over single frames) gets pictures."""
    nodes = [helper.make_node("Relu", ["frame"], ["y"])]
    inputs = [helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, 3, 1, 32, 32])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 1, 32, 32])]
    graph = load_model(_save(tmp_path, nodes, inputs, outputs, {}))
    arrays, description = synthetic_calibration(graph, 8, seed=0)
    assert arrays["frame"].shape == (8, 3, 1, 32, 32)
    assert "8 natural and text single-frame pictures, half inverted" in description
    medians = np.median(arrays["frame"].reshape(8, -1), axis=1)
    assert (medians > 0.5).sum() >= 2 and (medians < -0.5).sum() >= 2

def _token_model(tmp_path):
    """BERT-style inputs: ids through a Cast into a Gather on a [1000, 16] table, token types and
    positions into their own tables, the mask multiplying the sum."""
    rng = np.random.default_rng(0)
    tables = {
        "words": rng.standard_normal((1000, 16)).astype(np.float32),
        "types": rng.standard_normal((2, 16)).astype(np.float32),
        "positions": rng.standard_normal((16, 16)).astype(np.float32),
        "axis": np.array([2], dtype=np.int64),
    }
    tables["words"][500:520] *= 0.01  # never-trained rows: tiny norms
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["words", "ids32"], ["w"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
        helper.make_node("Gather", ["positions", "position_ids"], ["p"]),
        helper.make_node("Sum", ["w", "t", "p"], ["s"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis"], ["mu"]),
        helper.make_node("Mul", ["s", "mu"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, [1, 16])
              for n in ("input_ids", "attention_mask", "token_type_ids", "position_ids")]
    path = _save(tmp_path, nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16])], tables)
    return load_model(path)


def test_token_inputs(tmp_path):
    graph = _token_model(tmp_path)
    arrays, description = synthetic_calibration(graph, SAMPLES, seed=0)
    assert list(arrays) == graph.inputs
    assert all(a.shape == (SAMPLES, 16) and a.dtype == np.int64 for a in arrays.values())
    ids = arrays["input_ids"]
    assert ids.min() >= 1000 // 30 and ids.max() < 1000
    assert not np.isin(ids, np.arange(500, 520)).any()  # rows with tiny norms are skipped
    assert len(np.unique(ids)) > 100  # spread over the vocabulary ...
    assert np.mean(ids < 200) > np.mean(ids >= 800)  # ... more often low ids (Zipf)
    assert (arrays["token_type_ids"] == 0).all() and (arrays["position_ids"] == np.arange(16)).all()
    lengths = arrays["attention_mask"].sum(axis=1)  # ones, then zeros after each sample's length
    assert (arrays["attention_mask"] == (np.arange(16) < lengths[:, None])).all()
    assert lengths.min() >= 4 and lengths.max() <= 16 and len(np.unique(lengths)) >= 8  # 24 draws of 13 lengths
    assert "Zipf token ids in [33, 999]" in description
    assert "'attention_mask': ones for the first 4 to 16 tokens, then zeros" in description


def test_audio_and_other_floats(tmp_path):
    nodes = [helper.make_node("Mul", ["waveform", "gain"], ["y"]), helper.make_node("Relu", ["features"], ["z"])]
    inputs = [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, [1, 16000]),
              helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 10])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16000]),
               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 10])]
    graph = load_model(_save(tmp_path, nodes, inputs, outputs, {"gain": np.array(2.0, dtype=np.float32)}))
    arrays, description = synthetic_calibration(graph, 8, seed=0)
    wave = arrays["waveform"].astype(np.float64)
    peaks = np.abs(wave).max(axis=1)
    assert wave.shape == (8, 16000) and np.all((peaks >= 0.1) & (peaks <= 0.9)) and np.ptp(peaks) > 0.1
    spectrum = np.abs(np.fft.rfft(wave, axis=1))
    assert np.all(spectrum.max(axis=1) > 20 * np.median(spectrum, axis=1))  # partials stand out of the noise
    loudness = np.sqrt((wave.reshape(8, 50, 320) ** 2).mean(axis=2))  # per 20 ms at 16 kHz
    assert np.median(loudness.max(axis=1) / loudness.min(axis=1)) > 3  # notes start and fade; steady tones would not
    features = arrays["features"]
    assert features.shape == (8, 10) and abs(features.mean()) < 0.5 and 0.6 < features.std() < 1.4
    assert "'waveform': notes (audio)" in description and "'features': standard normal" in description
    assert waveform_values(graph) == 16000


@pytest.mark.parametrize("first, last", [(0, 4000), (1200, 4000), (0, 900), (700, 2500), (3000, 3000)])
def test_a_note_made_in_part_is_that_part_of_the_whole_note(first, last):
    """Only the part of a note inside its clip is made: samples ``first`` to ``last`` of a
    4000-sample note equal those of the whole note (1e-12), and the draws after it are the same.
    The whole note's period is the sum of its partials, ``Σ_h h^-p sin(2πhc + φ_h)``."""
    from spa_compiler.synthetic_audio import MAX_PARTIALS, RATE, TABLE, _note

    whole_rng, part_rng = np.random.default_rng(11), np.random.default_rng(11)
    whole, part = _note(whole_rng, 4000, 0, 4000), _note(part_rng, 4000, first, last)
    assert part.shape == (last - first,)
    np.testing.assert_allclose(part, whole[first:last], rtol=0, atol=1e-12)
    assert whole_rng.random() == part_rng.random()

    draws = np.random.default_rng(11)  # the note's parameters, drawn in _note's order
    fundamental = np.exp(draws.uniform(np.log(60.0), np.log(1000.0)))
    partials = np.arange(1, min(MAX_PARTIALS, int(RATE / 2 / fundamental)) + 1)
    amplitudes, phases = partials ** -draws.uniform(0.5, 2.5), draws.uniform(0, 2 * np.pi, len(partials))
    cycle = np.arange(TABLE + 1) / TABLE
    period = amplitudes @ np.sin(2 * np.pi * partials[:, None] * cycle + phases[:, None])
    t = np.arange(4000) / RATE
    attack, decay = np.minimum(1.0, t / draws.uniform(0.002, 0.05)), np.exp(-t * draws.uniform(0.0, 6.0))
    release = np.minimum(1.0, (4000 - np.arange(4000)) / (0.02 * RATE))
    expected = attack * decay * release * np.interp((fundamental * t) % 1.0, cycle, period)
    np.testing.assert_allclose(whole, expected, rtol=0, atol=1e-12)


def test_keras_inputs_float_ids_and_channels_last_audio(tmp_path):
    """As TensorFlow exports Keras models: character ids given as floats, cast to integers for an
    Embedding's Gather, get ids drawn from the table (not standard-normal floats, which cast to
    -2..2); a waveform ``[N, T, 1]`` gets notes, channels last."""
    table = np.random.default_rng(0).standard_normal((178, 8)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["chars"], ["ids"], to=TensorProto.INT32),
             helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("Relu", ["waveform"], ["z"])]
    inputs = [helper.make_tensor_value_info("chars", TensorProto.FLOAT, [1, 21]),
              helper.make_tensor_value_info("waveform", TensorProto.FLOAT, [1, 4000, 1])]
    outputs = [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 21, 8]),
               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4000, 1])]
    graph = load_model(_save(tmp_path, nodes, inputs, outputs, {"table": table}))
    arrays, description = synthetic_calibration(graph, 8, seed=0)
    chars = arrays["chars"]
    assert chars.dtype == np.float32 and (chars == np.round(chars)).all()
    assert chars.min() >= 0 and chars.max() < 178 and len(np.unique(chars)) > 20
    wave = arrays["waveform"].astype(np.float64)
    peaks = np.abs(wave).max(axis=(1, 2))
    assert wave.shape == (8, 4000, 1) and np.all((peaks >= 0.1) & (peaks <= 0.9))
    spectrum = np.abs(np.fft.rfft(wave[..., 0], axis=1))
    assert np.all(spectrum.max(axis=1) > 20 * np.median(spectrum, axis=1))
    assert "'waveform': notes (audio)" in description and "token ids" in description
    assert waveform_values(graph) == 4000


def test_waveform_values_count_the_inputs_that_get_notes(tmp_path):
    """A stereo clip ``[N, 2, T]`` counts its 2T values; a float mask of a waveform's length and a
    clip of more than two channels get no notes and count nothing."""
    nodes = [helper.make_node("Relu", [name], [f"{name}_out"]) for name in ("stereo", "attention_mask", "many")]
    shapes = {"stereo": [1, 2, 3000], "attention_mask": [1, 2000], "many": [1, 3, 3000]}
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in shapes.items()]
    outputs = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, shape) for name, shape in shapes.items()]
    graph = load_model(_save(tmp_path, nodes, inputs, outputs, {}))
    assert waveform_values(graph) == 6000
    _, description = synthetic_calibration(graph, 4, seed=0)
    assert "'stereo': notes (audio)" in description and "'attention_mask': ones (a mask)" in description
    assert "'many': standard normal" in description


def test_deterministic_for_a_seed(tmp_path):
    graph, _, _ = _image_model(tmp_path, batchnorm=True)
    first, text = synthetic_calibration(graph, 4, seed=3)
    again, text_again = synthetic_calibration(graph, 4, seed=3)
    other, _ = synthetic_calibration(graph, 4, seed=4)
    assert np.array_equal(first["x"], again["x"]) and text == text_again
    assert not np.array_equal(first["x"], other["x"])


def test_data_free_calibrates_on_512_token_sequences_256_pictures_or_2048_clips_by_default(tmp_path):
    """Synthetic token sequences default to 512, synthetic pictures to 256, synthetic clips to
    2048 (pictures and clips fewer when large, no fewer than 128), other synthetic inputs and
    user data to 128; an explicit --calib-samples wins."""
    from spa_compiler import PruneConfig, PruneState, analyze_graph
    from spa_compiler.stages import CollectStatistics

    def calibrated(graph):
        state = PruneState(config, graph=graph)
        state.analysis = analyze_graph(graph)
        return CollectStatistics().run(state)

    graph = _token_model(tmp_path)
    config = PruneConfig(flops=0.5, criterion="obs")
    assert (config.samples_for(), config.samples_for(synthetic_tokens=True)) == (128, 512)
    assert config.samples_for(picture_values=3 * 640 * 640) == 256
    assert config.samples_for(picture_values=3 * 16 * 224 * 224) == 222  # 16-frame clips: 2**29 values
    assert config.samples_for(picture_values=3 * 2048 * 2048) == 128
    assert PruneConfig(flops=0.5, calibration="data.npz").samples_for(picture_values=3 * 224 * 224) == 128
    assert PruneConfig(flops=0.5, calibration="data.npz").samples_for(synthetic_tokens=True) == 128
    assert PruneConfig(flops=0.5, calibration_samples=64).samples_for(synthetic_tokens=True) == 64
    assert config.samples_for(waveform_values=43844) == 2048  # two seconds at 22,050 Hz
    assert config.samples_for(waveform_values=30 * 16000) == 279  # half a minute at 16 kHz: 2**27 values
    assert config.samples_for(waveform_values=10**7) == 128
    assert PruneConfig(flops=0.5, calibration="data.npz").samples_for(waveform_values=43844) == 128
    state = calibrated(graph)
    assert state.calibration.startswith("data-free, 512 synthetic samples")
    assert len(state.calibration_data["input_ids"]) == 512
    assert calibrated(_image_model(tmp_path, True)[0]).calibration.startswith("data-free, 256 synthetic samples")


def test_verification_feeds_token_ids_from_the_prior(tmp_path):
    """Verification's first fidelity figure runs token ids like data-free calibration's, not all
    zeros (padding everywhere); floats stay standard normal."""
    from spa_compiler.verify import verification_inputs

    graph = _token_model(tmp_path)
    feeds, source = verification_inputs(graph, seed=0)
    assert source == "synthetic inputs (token ids from the vocabulary's prior)"
    ids = feeds["input_ids"]
    assert ids.shape == (1, 16) and ids.dtype == np.int64 and ids.min() >= 1000 // 30 and len(np.unique(ids)) > 8
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()
    assert (feeds["position_ids"] == np.arange(16)).all()
    again, _ = verification_inputs(graph, seed=0)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    image_graph, _, _ = _image_model(tmp_path, batchnorm=False)
    image_feeds, image_source = verification_inputs(image_graph, seed=0)
    assert image_source == "standard-normal inputs" and abs(float(image_feeds["x"].std()) - 1) < 0.2


@pytest.mark.accurate
def test_data_free_samples_of_one_input_are_warned_of(tmp_path):
    """Byte ids compared against ``0..K-1`` (a one-hot), no embedding table: spa-prune cannot tell
    what they hold, so every synthetic sample is zeros. The report says the figures, on copies of
    one input, say nothing of real ones."""
    import onnx.parser
    from rich.console import Console

    from spa_compiler import PruneConfig, prune
    from spa_compiler.report import render_report

    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int32[1, 6] ids) => (float[1, 4] y) {
            u = Unsqueeze (ids, Last)
            hot = Equal (u, Range)
            f = Cast <to = 1> (hot)
            h = MatMul (f, W1)
            r = Relu (h)
            p = ReduceMax <axes = [1], keepdims = 0> (r)
            y = MatMul (p, W2)
        }""")
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([
        numpy_helper.from_array(np.asarray([-1], np.int64), "Last"),
        numpy_helper.from_array(np.arange(8, dtype=np.int32), "Range"),
        numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2"),
    ])
    onnx.save(model, tmp_path / "m.onnx")
    report = prune(tmp_path / "m.onnx", tmp_path / "p.onnx", PruneConfig(flops=0.5, bench_runs=0))
    assert report.calibration_warning == "its 128 samples are all the same"
    console = Console(record=True, width=400)
    render_report(report, console)
    assert "warning: data-free, the synthetic samples describe one input" in console.export_text()
