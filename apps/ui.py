"""The Gradio page: a Classify tab and a Run tab, over one shared `Classifier`; for a vqa
run an Answer tab instead (`build_vqa_ui`: the images and a question box, one question for
every image of a request, examples of image and question from the run's test split).

Uploads arrive through `gr.File` rather than `gr.Image`/`gr.Gallery`: those decode the
upload in Gradio with PIL's defaults before our code sees it, whereas raw files go through
`load_image` exactly as `mmdeploy infer` reads them (same pixels, same label, same
decompression-bomb and size checks, same error messages), and several can be sent at once.
No `file_types` filter: files are judged by their content, as `infer` does, not by their
extension.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from ..errors import InputError, MmdeployError
from .service import Classifier, Prediction

TABLE_HEADERS = ["file", "label", "score", "error"]
ANSWER_HEADERS = ["file", "question", "answer", "score", "truncated", "error"]


@dataclass
class _ClassifyTab:
    """The Classify tab's components that a page wires to its own classify function."""

    files: gr.File
    button: gr.Button
    examples_slot: gr.Column  # filled by the page: examples need the outputs
    outputs: list  # label, status, gallery, table, and the rows' state


def _classify_tab(top_k: int, above_files: gr.Component | None = None,
                  below_files: gr.Component | None = None, verb: str = "Classify",
                  noun: str = "classes", headers: list[str] = TABLE_HEADERS) -> _ClassifyTab:
    """Upload and results side by side; `above_files` and `below_files` (made with
    `render=False`) are shown over and under the uploads. A click on a thumbnail shows that
    image's `noun` (classes, or a vqa run's answers)."""

    def select(predicted: list[dict], event: gr.SelectData):  # Gradio reads the annotation
        return _label_value(predicted[event.index])

    rows = gr.State([])
    with gr.Tab(verb), gr.Row():
        with gr.Column():
            if above_files is not None:
                above_files.render()
            files = gr.File(label="Images", file_count="multiple", type="filepath")
            if below_files is not None:
                below_files.render()
            button = gr.Button(verb, variant="primary")
            examples_slot = gr.Column()
        with gr.Column():
            label = gr.Label(label=f"Top {noun}", num_top_classes=top_k)
            status = gr.Markdown()
            gallery = gr.Gallery(label=f"Uploads (click one for its {noun})", columns=4,
                                 height=280, object_fit="contain", allow_preview=False)
            table = gr.Dataframe(headers=headers, label="Rows (as `mmdeploy infer`)",
                                 interactive=False, wrap=True)
    gallery.select(select, inputs=[rows], outputs=[label], api_visibility="private", queue=False)
    return _ClassifyTab(files, button, examples_slot, [label, status, gallery, table, rows])


def _uploads(paths: list[str] | None, cache: str) -> list[tuple[str, bytes]]:
    return [(Path(p).name, uploaded_file(p, cache)) for p in paths or []]


def _shown(result: Prediction, uploads: list, cache: str, status_prefix: str = "",
           table=None) -> tuple:
    """A classification's outputs, in `_ClassifyTab.outputs`' order; unreadable files are
    a warning, the rest is shown (the rows by `table`, default `_table`)."""
    if result.errors:
        gr.Warning(f"{len(result.errors)} of {len(uploads)} files could not be read: "
                   + "; ".join(result.errors))
    thumbnails = [(save_thumbnail(image, cache), caption)
                  for image, caption in result.thumbnails]
    return (_label_value(result.predicted[0]), status_prefix + status_markdown(result),
            thumbnails, (table or _table)(result.rows), result.predicted)


def build_ui(classifier: Classifier, examples: list[Path], examples_note: str = "",
             show_paths: bool = False) -> gr.Blocks:
    """The page; the request queue and limits are set by the server that mounts it."""
    details = classifier.public_details(show_paths)
    title = f"mmdeploy: {details['adapter']} on {details['backbone']}"

    def classify(paths: list[str] | None):
        try:
            uploads = _uploads(paths, blocks.GRADIO_CACHE)
            result = classifier.classify(uploads)
        except MmdeployError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return _shown(result, uploads, blocks.GRADIO_CACHE)

    # Uploads and thumbnails are files in Gradio's cache: sweep those older than 10 minutes
    # every minute, or a long-running server fills its disk.
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(60, 600)) as blocks:
        gr.Markdown(f"## {title}\n{len(classifier.class_names)} classes, served by "
                    f"**{classifier.backend}**. Limits: {classifier.limits.describe()}.")
        tab = _classify_tab(classifier.limits.top_k)
        with gr.Tab("Run"):
            gr.Markdown(run_markdown(classifier, details))
        with tab.examples_slot:
            if examples:
                gr.Examples([[[str(path)]] for path in examples], inputs=[tab.files],
                            outputs=tab.outputs, fn=classify, run_on_click=True,
                            cache_examples=False,
                            label="Examples from the run's held-out test split (click to run)")
            elif examples_note:
                gr.Markdown(examples_note)
        tab.button.click(classify, inputs=[tab.files], outputs=tab.outputs,
                         api_name="classify")
    return blocks


def build_vqa_ui(classifier: Classifier, examples: list[tuple[Path, str]],
                 examples_note: str = "", show_paths: bool = False) -> gr.Blocks:
    """A vqa run's page: as `build_ui`, with a question box under the images (the question
    asks every image of the request) and examples of an image and its question; its API is
    `/answer(files, question)`."""
    details = classifier.public_details(show_paths)
    title = f"mmdeploy: {details['adapter']} on {details['backbone']}"

    def answer(paths: list[str] | None, question: str | None):
        try:
            uploads = _uploads(paths, blocks.GRADIO_CACHE)
            result = classifier.answer(uploads, [question])
        except MmdeployError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        cut = any(row.get("truncated") for row in result.predicted)
        note = ("the question was cut at the tokenizer's limit: answered from its first "
                "tokens. ") if cut else ""
        return _shown(result, uploads, blocks.GRADIO_CACHE, note, table=_answer_table)

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(60, 600)) as blocks:
        gr.Markdown(f"## {title}\nImage + question: {len(classifier.class_names)} answers, "
                    f"served by **{classifier.backend}**. The question asks every image "
                    f"uploaded. Limits: {classifier.limits.describe()}.")
        question = gr.Textbox(label="Question", placeholder="what color is the shape?",
                              render=False)
        tab = _classify_tab(classifier.limits.top_k, below_files=question, verb="Answer",
                            noun="answers", headers=ANSWER_HEADERS)
        with gr.Tab("Run"):
            gr.Markdown(run_markdown(classifier, details))
        with tab.examples_slot:
            if examples:
                # Gradio names the example's event after its function: not `answer`, which
                # is the button's API name.
                def answer_example(paths: list[str] | None, question: str | None):
                    return answer(paths, question)

                gr.Examples([[[str(path)], text] for path, text in examples],
                            inputs=[tab.files, question], outputs=tab.outputs,
                            fn=answer_example, run_on_click=True, cache_examples=False,
                            label="Examples from the run's held-out test split: an image and "
                                  "its question (click to run)")
            elif examples_note:
                gr.Markdown(examples_note)
        tab.button.click(answer, inputs=[tab.files, question], outputs=tab.outputs,
                         api_name="answer")
        question.submit(answer, inputs=[tab.files, question], outputs=tab.outputs,
                        api_name="answer_on_enter", api_visibility="private")
    return blocks


def build_adapters_ui(service, examples: list[Path], examples_note: str = "",
                      show_paths: bool = False) -> gr.Blocks:
    """The page of a shared export (`apps.adapters.AdapterService`): as `build_ui`, with a
    dropdown of the adapters served (the default first; refreshed when the page loads, as
    adapters come and go) and an Adapters tab of their classes and parity."""

    def classify(paths: list[str] | None, adapter: str | None):
        try:
            uploads = _uploads(paths, blocks.GRADIO_CACHE)
            name, result = service.classify(uploads, adapter, thumbnails=True)
        except MmdeployError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return _shown(result, uploads, blocks.GRADIO_CACHE, f"adapter **{name}**, ")

    def refresh():
        return (gr.update(choices=service.adapters, value=service.default),
                adapters_markdown(service.describe(show_paths)))

    title = f"mmdeploy: {len(service.adapters)} adapters on one trunk"
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(60, 600)) as blocks:
        gr.Markdown(f"## {title}\nServed by **{service.backend}**. Limits: "
                    f"{service.limits.describe()}.")
        adapter = gr.Dropdown(service.adapters, value=service.default, label="Adapter",
                              allow_custom_value=True, render=False)
        tab = _classify_tab(service.limits.top_k, adapter)
        with gr.Tab("Adapters"):
            listing = gr.Markdown(adapters_markdown(service.describe(show_paths)))
        with tab.examples_slot:
            if examples:
                gr.Examples([[[str(path)]] for path in examples], inputs=[tab.files],
                            outputs=tab.outputs, fn=lambda paths: classify(paths, None),
                            run_on_click=True, cache_examples=False,
                            label="Examples from the default adapter's held-out test split")
            elif examples_note:
                gr.Markdown(examples_note)
        tab.button.click(classify, inputs=[tab.files, adapter], outputs=tab.outputs,
                         api_name="classify")
        blocks.load(refresh, outputs=[adapter, listing], api_visibility="private",
                    queue=False)
    return blocks


def adapters_markdown(adapters: list[dict]) -> str:
    """The Adapters tab: each adapter served and how its branch matched its run's PyTorch
    model through the trunk."""
    lines = ["| adapter | class | run | classes | parity | max abs | min cosine | "
             "top-1 agreement | requests |", "|---|---|---|---|---|---|---|---|---|"]
    for a in adapters:
        parity = a["parity"]
        lines.append(f"| **{a['name']}** | {a['adapter']} | `{a['run']}` | "
                     f"{len(a['classes'])}: {', '.join(a['classes'])} | "
                     f"{'passed' if parity['passed'] else 'failed'} ({parity['backend']}, "
                     f"batches {parity['batches']}) | {_figure(parity, 'max_abs', '.2e')} | "
                     f"{_figure(parity, 'min_cosine', '.6f')} | "
                     f"{_figure(parity, 'top1_agreement', '.1%')} | "
                     f"{a['served']['requests']} |")
    return "\n".join(lines)


def uploaded_file(path: str, cache: str) -> str:
    """`path` if it lies in Gradio's cache, where client uploads (and the app's examples)
    are stored; any other server path is refused without being opened. Gradio itself
    refuses such paths before calling us (see `server.build_app`); this holds if it ever
    does not."""
    real = os.path.realpath(path)
    if os.path.commonpath([real, os.path.realpath(cache)]) != os.path.realpath(cache):
        raise InputError(f"{Path(path).name}: not a file uploaded to this server")
    return real


def save_thumbnail(image: Image.Image, cache: str) -> str:
    """Write `image` as a PNG named by its content under Gradio's cache and return the path.

    Written to a temporary name and renamed into place, so a client downloading it while
    another request writes the same thumbnail gets a whole file (Gradio's own saving of
    returned images writes the shared file in place: clients got truncated files). In the
    cache, Gradio serves the file as it is and sweeps it with its uploads."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    folder = Path(cache, "mmdeploy-thumbnails")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    handle, staging = tempfile.mkstemp(dir=folder, prefix=".thumbnail-", suffix=".png")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return str(target)


def status_markdown(result: Prediction) -> str:
    total = result.decode_ms + result.model_ms
    count = len(result.predicted)
    return (f"**{result.backend}**: {count} image{'s' if count != 1 else ''} in "
            f"{total:.1f} ms (decode + preprocess {result.decode_ms:.1f} ms, model "
            f"{result.model_ms:.1f} ms)")


def run_markdown(classifier: Classifier, details: dict) -> str:
    """The Run tab: what is being served and how well its export matched PyTorch."""
    d = details
    options = ", ".join(f"{key}={value}" for key, value in d["adapter_config"].items())
    facts = [
        ("run", f"`{d['run']}`"),
        ("adapter", f"{d['adapter']} ({options})"),
        ("backbone", d["backbone"]),
        ("trainable parameters", f"{d['parameters'].get('trainable', 0):,}"),
        (f"{'answers' if classifier.task == 'vqa' else 'classes'} ({len(d['classes'])})",
         ", ".join(d["classes"])),
        ("backend", classifier.backend),
        *[("not using", reason) for reason in classifier.skipped],
        ("limits", classifier.limits.describe()),
    ]
    lines = ["| | |", "|---|---|", *[f"| **{key}** | {value} |" for key, value in facts], ""]
    exports = d.get("exports", {})
    if not exports:
        return "\n".join([*lines, "No export yet: PyTorch serves (`mmdeploy export` first)."])
    lines += ["**Each export against PyTorch** (parity, or the INT8 accuracy gate; worst over "
              "the checked batches)", "",
              "| export | backend | precision | batches | check | passed | max abs | "
              "min cosine | top-1 agreement |", "|---|---|---|---|---|---|---|---|---|"]
    for name, export in exports.items():
        lines.append(f"| {name} | {export['backend']} | {export['precision']} | "
                     f"{export['batch_range']} | {export['check']} | {export['passed']} | "
                     f"{_figure(export, 'max_abs', '.2e')} | "
                     f"{_figure(export, 'min_cosine', '.6f')} | "
                     f"{_figure(export, 'top1_agreement', '.1%')} |")
    return "\n".join(lines)


def _figure(report: dict, key: str, spec: str) -> str:
    value = report.get(key)
    return "n/a" if value is None else format(value, spec)


def _label_value(row: dict) -> dict[str, float]:
    return dict(row["topk"])


def _table(rows: list[dict]) -> list[list]:
    return [[row["path"], row["label"], row["score"], row["error"] or ""] for row in rows]


def _answer_table(rows: list[dict]) -> list[list]:
    return [[row["path"], row["question"], row["answer"], row["score"], row["truncated"],
             row["error"] or ""] for row in rows]
