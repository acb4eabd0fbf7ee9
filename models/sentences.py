"""English sentences, tokenisation and onnxruntime sentence embeddings for sentence-encoder checks.

``SENTENCES`` (evaluation) and ``CALIBRATION`` (data-aware pruning criteria) are disjoint
sets of natural sentences of mixed topics and lengths.  ``embed`` runs an exported encoder
(inputs ``input_ids``/``attention_mask``/``token_type_ids``, first output the last hidden
state) with onnxruntime alone and mean-pools it over the attention mask, as
sentence-transformers does for all-MiniLM-L6-v2; ``mean_cosine`` compares two runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

__all__ = ["CALIBRATION", "ENCODER_INPUTS", "SENTENCES", "embed", "mean_cosine", "tokenize"]

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
"""The BERT-style encoder inputs, in the order of the exported models' arguments."""

SENTENCES: tuple[str, ...] = (
    "The mitochondria produce most of the chemical energy that a cell needs to stay alive.",
    "Water boils at a lower temperature on a mountain because the air pressure is lower.",
    "Light from the Sun takes a little over eight minutes to reach the Earth.",
    "Researchers sequenced the genome of the plant to find out why it tolerates drought so well.",
    "Black holes bend light so strongly that nothing, not even a photon, can escape from inside the horizon.",
    "Vaccines train the immune system to recognise a pathogen before a real infection happens.",
    "How many moons does Jupiter have?",
    "The experiment failed because the samples had been contaminated during transport.",
    "Plate tectonics explains why earthquakes cluster along the edges of the continents.",
    "Add a pinch of salt to the pasta water before it comes to the boil.",
    "Let the dough rest for an hour in a warm place until it has doubled in size.",
    "She roasted the vegetables with garlic, rosemary and a generous drizzle of olive oil.",
    "What is the best way to keep fresh herbs from wilting in the fridge?",
    "The soup tasted bland, so he stirred in some lemon juice and black pepper.",
    "Whisk the eggs and sugar until the mixture turns pale and thick.",
    "Our grandmother's apple pie recipe calls for cinnamon, nutmeg and a buttery lattice crust.",
    "Sear the steak on a very hot pan for two minutes on each side, then let it rest.",
    "The home team scored in the final minute and won the championship.",
    "He has been training for the marathon every morning since January.",
    "Who won the tennis tournament last weekend?",
    "The referee showed the defender a red card after a dangerous tackle.",
    "Cycling up the mountain pass in the rain was the hardest part of the race.",
    "The swimmer broke the world record by less than a tenth of a second.",
    "Our basketball coach makes us practise free throws until we hit ten in a row.",
    "Is the stadium far from the train station?",
    "We missed our connecting flight in Frankfurt and had to spend the night at the airport.",
    "The old town is best explored on foot, early in the morning before the crowds arrive.",
    "Do I need a visa to visit Japan for two weeks?",
    "The ferry to the island leaves every hour from the harbour.",
    "They rented a small car and drove along the coast for ten days, stopping wherever they liked.",
    "Pack light, because the hostel rooms are tiny and the stairs are steep.",
    "The museum was closed on Monday, so we visited the botanical garden instead.",
    "A night train is a comfortable way to cross the country while you sleep.",
    "The central bank raised interest rates to slow down inflation.",
    "Shares in the company fell sharply after it missed its quarterly earnings forecast.",
    "Should I pay off my student loan early or invest the money instead?",
    "Diversifying a portfolio reduces the risk of losing money when one sector collapses.",
    "The startup raised twenty million dollars in its latest funding round.",
    "Rising mortgage rates have cooled the housing market in most large cities.",
    "She keeps a detailed budget and saves a fifth of her salary every month.",
    "The bond market reacted calmly to the government's new spending plan.",
    "Heavy rain is expected across the north of the country tomorrow afternoon.",
    "It was so foggy this morning that I could barely see the end of the street.",
    "Will it snow over the holidays this year?",
    "A heatwave pushed temperatures above forty degrees for the third day in a row.",
    "The storm knocked down power lines and left thousands of homes without electricity.",
    "Bring an umbrella, the forecast says showers all day.",
    "Clear skies and a light breeze made it a perfect evening for a picnic.",
    "I love you.",
    "Thanks!",
    "Where did I leave my keys?",
    "The meeting has been moved to Thursday at three o'clock.",
    "My laptop battery drains much faster since the last software update.",
    "Please remember to water the plants while I am away.",
    "The children built a sandcastle and watched the tide wash it away.",
    "After years of arguing about it, the city finally agreed to build a new bridge over the river.",
    "The library extended its opening hours so that students can study late during exams.",
    "Can you recommend a good book about the history of the Roman Empire?",
    "A dog barked somewhere in the distance.",
    (
        "The novel follows three generations of a family who run a small hotel by the sea, and it slowly"
        " reveals the secrets each of them tried to hide from the others."
    ),
    (
        "Although the expedition had planned every detail for more than a year, a sudden change in the weather,"
        " a broken radio and a supply boat that never arrived forced the team to abandon the glacier, walk for"
        " four days across the tundra and wait in a fishing village until a plane could finally take them home."
    ),
    "Learning a new language is easier when you practise speaking with native speakers every day.",
    "The train was delayed by forty minutes because of a signal failure near the station.",
    "Why do cats purr?",
    "The new smartphone has a better camera but a shorter battery life than the previous model.",
)
"""Evaluation sentences: science, cooking, sport, travel, finance, weather, everyday life; questions;
from one word to a long sentence."""

CALIBRATION: tuple[str, ...] = (
    "Photosynthesis turns carbon dioxide and water into sugar using the energy of sunlight.",
    "The telescope captured images of a galaxy more than ten billion light years away.",
    "Antibiotics do not work against viruses such as the common cold.",
    "Why is the sky blue during the day and red at sunset?",
    "The chemist measured the reaction rate at five different temperatures.",
    "Fossils found in the desert suggest that the region was once covered by a shallow sea.",
    "Chop the onions finely and fry them gently until they are soft and golden.",
    "This curry is much spicier than the one we made last week.",
    "How long should I bake a chicken breast in the oven?",
    "Fresh bread from the bakery around the corner sells out before nine every morning.",
    "Serve the salad immediately, otherwise the leaves will go soggy.",
    "The goalkeeper saved a penalty in the last minute of extra time.",
    "She finished the race in third place despite an injured ankle.",
    "Which team has won the most football world cups?",
    "The climbers reached the summit just before the weather turned.",
    "Our local club is looking for volunteers to help coach the under-twelves.",
    "The hotel room had a balcony with a wonderful view of the harbour.",
    "We took a bus from the airport to the city centre because the taxis were too expensive.",
    "Is it safe to drink the tap water here?",
    "Backpacking through South America taught him to live with very little.",
    "The border crossing took three hours because of a long queue of trucks.",
    "Inflation has eaten into household savings over the past two years.",
    "The company announced it would cut two hundred jobs to reduce costs.",
    "What is the difference between a stock and a bond?",
    "Her pension fund invests mainly in government bonds and index funds.",
    "The price of oil jumped after the announcement of lower production targets.",
    "Strong winds are forecast along the coast tonight, with gusts of up to ninety kilometres an hour.",
    "The lake froze completely during the coldest week of the winter.",
    "Is it going to rain on Saturday?",
    "After a dry summer, the farmers were relieved when the autumn rains finally came.",
    "Good morning!",
    "The printer on the second floor is out of paper again.",
    "Could you send me the report before the end of the day?",
    "He apologised for being late and blamed the traffic.",
    "The garden looks beautiful now that the roses are in bloom.",
    "My sister is moving to a new flat closer to her office next month.",
    "The film was too long, but the music and the photography were stunning.",
    "Our neighbours adopted a puppy from the animal shelter last weekend.",
    (
        "When she opened the old wooden box she had found in the attic, she discovered letters her grandfather"
        " had written during the war, tied together with a faded blue ribbon."
    ),
    "The software engineer fixed the bug by adding a check for empty input.",
    "Where is the nearest pharmacy?",
    "Reading before bed helps me fall asleep faster.",
    "The orchestra rehearsed the symphony for weeks before the opening night.",
)
"""Calibration sentences, none of which appears in ``SENTENCES``."""


def tokenize(
    tokenizer: Callable[..., Mapping[str, Any]], sentences: Sequence[str], seq_len: int = 128
) -> dict[str, np.ndarray]:
    """Tokenise with a Hugging Face tokenizer: ``ENCODER_INPUTS`` as int64 arrays of shape (n, seq_len).

    Sentences are padded (attention mask 0) or truncated to exactly ``seq_len`` tokens.
    """
    encoded = tokenizer(
        list(sentences),
        padding="max_length",
        truncation=True,
        max_length=seq_len,
        return_token_type_ids=True,
        return_tensors="np",
    )
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in ENCODER_INPUTS}


def embed(model_path: str | os.PathLike[str], inputs: Mapping[str, np.ndarray], batch: int = 16) -> np.ndarray:
    """Mean-pooled sentence embeddings (n, hidden) of an ONNX encoder run with onnxruntime.

    ``inputs`` is a ``tokenize`` result; the model is fed the inputs it declares, ``batch``
    sentences at a time (one at a time when its batch axis is fixed to 1), and its first
    output (n, seq, hidden) is averaged over the positions where ``attention_mask`` is 1.
    """
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]
    step = 1 if session.get_inputs()[0].shape[0] == 1 else batch
    pooled = []
    for start in range(0, len(inputs["attention_mask"]), step):
        hidden = session.run(None, {name: inputs[name][start : start + step] for name in names})[0]
        mask = inputs["attention_mask"][start : start + step, :, None].astype(hidden.dtype)
        pooled.append((hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9))
    return np.concatenate(pooled)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the cosine similarity between matching rows of ``a`` and ``b`` (n, d)."""
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in shape: {a.shape} != {b.shape}")
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(np.mean(np.sum(a * b, axis=1) / norms))
