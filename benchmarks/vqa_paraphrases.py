"""A trained vqa run on questions worded unlike easy-VQA's 107 templates.

    python benchmarks/vqa_paraphrases.py RUN [--images 100]

Of the first `--images` images of easy-VQA's test split, those whose colour and shape the
answers to their template questions give (not every image is asked both) are each asked 24
paraphrases written here (8 asking the colour, 8 the shape, 8 yes/no about a colour or a
shape, half of them true); the run's accuracy on them is printed beside its accuracy on the
same images' template questions. Writes nothing. `vqa_learning_comparison.py` reports the
same figures for each run it trains (`paraphrase_accuracy`).
"""

from __future__ import annotations

import argparse
import random

import easy_vqa

from mmdeploy.data import EASY_VQA, Sample, load_labeled
from mmdeploy.runs import load_model
from mmdeploy.trainers.loop import accuracy
from mmdeploy.trainers.split import decode

COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
ASK_COLOUR = ("which colour is the object?", "tell me the colour of the figure",
              "what colour does the thing in the picture have?", "the shape is what color",
              "can you name the color of the object?", "what hue is the shape?",
              "which color was used to draw the shape?", "color of the figure?")
ASK_SHAPE = ("what kind of shape do you see?", "name the geometric figure in the picture",
             "which shape is drawn here?", "what is the object in the image?",
             "what form does the figure have?", "tell me which shape this is",
             "the picture shows what shape?", "what sort of figure is this?")
ASK_COLOUR_YES_NO = ("is the object {}?", "is the figure coloured {}?",
                     "do you see something {}?", "is anything in the picture {}?")
ASK_SHAPE_YES_NO = ("can you spot a {} here?", "does the picture show a {}?",
                    "is the figure a {}?", "is this shape a {}?")


def paraphrases(image: str, colour: str, shape: str, rng: random.Random) -> list[Sample]:
    rows = [(q, colour) for q in ASK_COLOUR] + [(q, shape) for q in ASK_SHAPE]
    for index, template in enumerate(ASK_COLOUR_YES_NO):
        asked = colour if index % 2 == 0 else rng.choice([c for c in COLOURS if c != colour])
        rows.append((template.format(asked), "yes" if asked == colour else "no"))
    for index, template in enumerate(ASK_SHAPE_YES_NO):
        asked = shape if index % 2 == 0 else rng.choice([s for s in SHAPES if s != shape])
        rows.append((template.format(asked), "yes" if asked == shape else "no"))
    return [Sample(image, image, answer, question=q) for q, answer in rows]


def paraphrase_accuracy(model, class_names: list[str], images: int = 100) -> dict:
    """Accuracy of a vqa `model` on its answers' paraphrased questions and on the template
    questions of the same test images (see the module), with their counts."""
    index = {name: i for i, name in enumerate(class_names)}
    test = load_labeled(EASY_VQA).test
    paths = easy_vqa.get_test_image_paths()
    first = {paths[i] for i in sorted(paths)[:images]}
    templates = [s for s in test if s.name in first]
    answers: dict[str, set[str]] = {}
    for sample in templates:
        answers.setdefault(sample.name, set()).add(class_names[sample.label])
    rng = random.Random(0)
    known = [image for image in sorted(answers)  # its answers give its colour and shape
             if answers[image] & set(COLOURS) and answers[image] & set(SHAPES)]
    asked = []
    for image in known:
        (colour,), (shape,) = answers[image] & set(COLOURS), answers[image] & set(SHAPES)
        asked += [Sample(s.name, s.image, index[s.label], question=s.question)
                  for s in paraphrases(image, colour, shape, rng)]
    templates = [s for s in templates if s.name in set(known)]
    figures = {"images": len(known)}
    for name, samples in (("templates", templates), ("paraphrases", asked)):
        figures[f"{name}_questions"] = len(samples)
        figures[name] = accuracy(model, decode(samples, model.backbone, name), 64)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    model, run = load_model(args.run)
    figures = paraphrase_accuracy(model, run.class_names, args.images)
    for name in ("templates", "paraphrases"):
        print(f"{name}: {figures[name + '_questions']} questions on {figures['images']} "
              f"images, accuracy {100 * figures[name]:.1f}%")


if __name__ == "__main__":
    main()
