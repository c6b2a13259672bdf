"""A vqa run's predictor: each image answered with its own question, questions checked and
tokenized in one place (`mmdeploy.questions`), cut at the tokenizer's limit exactly as
training cut them, and one clear line for what cannot be asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmdeploy.errors import InputError
from mmdeploy.questions import MAX_QUESTION_CHARS, QuestionTokenizer, check_question
from mmdeploy.runs import load_model
from mmdeploy.runtime.torch import TorchPredictor


@pytest.fixture(scope="module")
def predictor(vqa_run):
    return TorchPredictor(vqa_run, device="cpu")


def _images(vqa_manifest, count):
    paths = sorted(vqa_manifest.parent.glob("*.png"))[:count]
    return [Image.open(p).convert("RGB") for p in paths]


def test_answers_are_the_models_own(predictor, vqa_run, vqa_manifest):
    images = _images(vqa_manifest, 3)
    questions = ["what color is the shape?", "is there a red shape?", "what?"]
    answers = predictor.predict_questions(images, questions)
    model, _ = load_model(vqa_run)
    backbone = model.backbone
    tokens = backbone.tokenize(questions)
    with torch.inference_mode():
        logits, _ = model.eval()(torch.from_numpy(predictor.preprocessor(images)),
                                 tokens["input_ids"], tokens["attention_mask"])
    np.testing.assert_allclose(answers.probs, torch.softmax(logits, -1).numpy(),
                               rtol=1e-5, atol=1e-6)
    assert answers.truncated == [False, False, False]
    assert answers.probs.shape == (3, len(predictor.class_names))
    assert list(answers.labels) == list(answers.probs.argmax(-1))


def test_a_question_over_the_limit_is_cut_as_training_cut_it(predictor, vqa_manifest):
    tokenizer = predictor.question_tokenizer
    limit = tokenizer.max_length
    long = "is there a red shape " * limit + "?"
    encoded = tokenizer.encode([long, "what is the shape?"])
    assert encoded.truncated == [True, False]
    assert encoded.input_ids.shape == (2, limit)
    trained = predictor.model.backbone.tokenize([long, "what is the shape?"])
    np.testing.assert_array_equal(encoded.input_ids, trained["input_ids"].numpy())
    np.testing.assert_array_equal(encoded.attention_mask, trained["attention_mask"].numpy())
    answers = predictor.predict_questions(_images(vqa_manifest, 2), [long, "what?"])
    assert answers.truncated == [True, False]


@pytest.mark.parametrize("question, message", [
    ("", "the question is empty"),
    ("   \n", "the question is empty"),
    (None, "no question: a vqa run answers an image and a question"),
    (b"\xff\xfe what", "the question is not UTF-8 text (byte 0)"),
    (7, "the question must be text, not int"),
    ("x" * (MAX_QUESTION_CHARS + 1),
     f"the question has {MAX_QUESTION_CHARS + 1} characters; at most {MAX_QUESTION_CHARS} "
     "are read"),
])
def test_what_cannot_be_asked_is_one_line(question, message):
    with pytest.raises(InputError) as error:
        check_question(question)
    assert str(error.value) == message


def test_utf8_bytes_and_padding_spaces_are_a_question():
    assert check_question(" what colour é? ".encode()) == "what colour é?"


def test_the_task_decides_what_a_predictor_takes(predictor, tiny_run, vqa_manifest):
    images = _images(vqa_manifest, 2)
    with pytest.raises(InputError, match="^this is a vqa run: ask a question with each image$"):
        predictor.predict(images)
    with pytest.raises(InputError, match=r"^1 question\(s\) for 2 image\(s\): one question "):
        predictor.predict_questions(images, ["what?"])
    classifier = TorchPredictor(tiny_run, device="cpu")
    with pytest.raises(InputError, match="^this is a classification run: it takes images, "
                                         "not questions$"):
        classifier.predict_questions(images, ["what?", "what?"])


def test_a_saved_tokenizer_encodes_alike(predictor, tmp_path):
    from mmdeploy.questions import save_tokenizer

    own = predictor.question_tokenizer
    files = save_tokenizer(own.tokenizer, own.max_length, tmp_path / "tokenizer")
    assert "question_limits.json" in files
    loaded = QuestionTokenizer.load(tmp_path / "tokenizer")
    questions = ["is no brown shape present?", "what color is the shape?" * 20]
    a, b = own.encode(questions), loaded.encode(questions)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert a.truncated == b.truncated and loaded.max_length == own.max_length
