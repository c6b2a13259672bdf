"""Classify images (or, for a vqa run, answer a question about each) on a Triton server
that serves a repository written by `mmdeploy export --format triton` (copied into it as
`client.py`).

    python client.py --url localhost:8001 --model NAME photo.jpg more.png
    python client.py --model NAME --question "what color is the shape?" photo.png

Images are decoded and preprocessed by the toolkit itself, with the preprocessing the
export recorded in `NAME/mmdeploy.json`, so the server sees exactly the pixels
`mmdeploy infer` would feed the model; a question is tokenized by the run's own tokenizer,
saved with the export in `NAME/tokenizer/` (cut at its limit, as training cut it; the row
says so); rows are printed in `mmdeploy infer`'s format. Needs
`pip install 'mm-peft-deploy[triton]'`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mmdeploy.errors import InputError
from mmdeploy.images import Preprocessor, load_image
from mmdeploy.interface import INPUT_NAME, QUESTION_INPUT_NAMES
from mmdeploy.questions import TOKENIZER_DIR, EncodedQuestions, QuestionTokenizer, check_question
from mmdeploy.rows import error_row, prediction_row

HERE = Path(__file__).resolve().parent


def model_folder(name: str | None, root: Path = HERE) -> Path:
    """The named model folder, or the repository's ONNX model when none is named."""
    if name is None:
        name = min(p.parent.name for p in root.glob("*/mmdeploy.json"))
    return root / name


def preprocess(model_dir: Path, paths: list[str]) -> tuple[np.ndarray, list[dict | None]]:
    """Pixels [N, 3, H, W] of the images that decode, and an error row (or None) per path."""
    preprocessor = Preprocessor.from_dict(
        json.loads((model_dir / "mmdeploy.json").read_text())["preprocessing"])
    images, rows = [], []
    for path in paths:
        try:
            image = load_image(path)
            preprocessor.check(image, path)
        except InputError as exc:
            rows.append(error_row(path, str(exc)))
            continue
        images.append(image)
        rows.append(None)
    height, width = preprocessor.image_size
    pixels = preprocessor(images) if images else np.zeros((0, 3, height, width), np.float32)
    return pixels, rows


def encode_questions(model_dir: Path, questions: list[str]) -> EncodedQuestions:
    """Token ids and mask [N, T] int64 of checked questions, by the run's saved tokenizer."""
    tokenizer = QuestionTokenizer.load(model_dir / TOKENIZER_DIR)
    return tokenizer.encode([check_question(q) for q in questions])


def request(pixels: np.ndarray, questions: EncodedQuestions | None = None,
            rows: slice = slice(None)):
    """The gRPC inputs and requested outputs for one batch of pixels (and, for a vqa
    model, their questions' tokens: `rows` of `questions`)."""
    import tritonclient.grpc as grpcclient

    pixel_values = grpcclient.InferInput(INPUT_NAME, list(pixels.shape), "FP32")
    pixel_values.set_data_from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    inputs = [pixel_values]
    if questions is not None:
        for name, tokens in zip(QUESTION_INPUT_NAMES,
                                (questions.input_ids, questions.attention_mask), strict=True):
            tensor = grpcclient.InferInput(name, list(tokens[rows].shape), "INT64")
            tensor.set_data_from_numpy(np.ascontiguousarray(tokens[rows], dtype=np.int64))
            inputs.append(tensor)
    return inputs, [grpcclient.InferRequestedOutput("logits")]


def rows_from_logits(paths: list[str], rows: list[dict | None], logits: np.ndarray,
                     class_names: list[str], top_k: int = 5,
                     questions: tuple[list[str], list[bool]] | None = None) -> list[dict]:
    """Fill the rows of the decoded images from the model's logits, in path order; a vqa
    model's rows also carry their question and whether it was cut at the tokenizer's limit
    (`questions`: the question and the flag of each decoded image, in order)."""
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    probs = iter(shifted / shifted.sum(-1, keepdims=True))
    asked = iter(zip(*questions, strict=True)) if questions is not None else None
    filled = []
    for path, row in zip(paths, rows, strict=True):
        if row is None:
            row = prediction_row(path, (prob := next(probs)), int(prob.argmax()), class_names,
                                 top_k)
            if asked is not None:
                row["question"], row["truncated"] = next(asked)
        filled.append(row)
    return filled


def main() -> None:
    import tritonclient.grpc as grpcclient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--url", default="localhost:8001", help="Triton's gRPC address.")
    parser.add_argument("--model", default=None, help="Model name (default: the ONNX one).")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--question", default=None,
                        help="A vqa model's question, asked of every image.")
    args = parser.parse_args()
    model_dir = model_folder(args.model)
    metadata = json.loads((model_dir / "mmdeploy.json").read_text())
    vqa = metadata.get("task") == "vqa"
    if vqa and args.question is None:
        parser.error("this is a vqa model: ask a question (--question)")
    if not vqa and args.question is not None:
        parser.error("this model classifies images: it takes no question")
    class_names = (model_dir / "labels.txt").read_text().splitlines()
    pixels, rows = preprocess(model_dir, args.images)
    questions = None
    if vqa and len(pixels):
        try:
            questions = encode_questions(model_dir, [args.question] * len(pixels))
        except InputError as exc:
            parser.error(str(exc))
    batch = metadata["batch_range"]["max"]
    client = grpcclient.InferenceServerClient(args.url)
    logits = [np.zeros((0, len(class_names)), np.float32)]
    for start in range(0, len(pixels), batch):  # the server refuses batches over its max
        chunk = slice(start, start + batch)
        inputs, outputs = request(pixels[chunk], questions, chunk)
        result = client.infer(model_dir.name, inputs, outputs=outputs)
        logits.append(result.as_numpy("logits"))
    asked = ([args.question.strip()] * len(pixels), questions.truncated) if questions else None
    for row in rows_from_logits(args.images, rows, np.concatenate(logits), class_names,
                                args.top_k, asked):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
