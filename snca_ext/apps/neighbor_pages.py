"""The neighbour pages of ``python -m snca_ext.neighbors``: the queries (``choose_queries``), their
nearest bank rows (``retrieve``) and the pages that show them, a self-contained HTML page
(``write_html``) and a PNG grid (``write_png``)."""

from __future__ import annotations

import base64
import copy
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor, nn

from snca_ext import bank_topk

from .data import ClassSubset, DigitsDataset, IndexedDataset
from .data.fashion_mnist import GreyImages
from .errors import ExportError
from .trained import (
    dataset_indices,
)

CORRECT, WRONG = "#1a9850", "#d73027"


@dataclass
class ModelRows:
    """One model's retrievals for every query: similarities and bank positions [queries, k]."""

    name: str
    values: Tensor
    positions: Tensor


def _base(dataset: IndexedDataset, position: int) -> tuple[IndexedDataset, int]:
    while isinstance(dataset, ClassSubset):
        dataset, position = dataset.parent, int(dataset.rows[position])
    return dataset, position


def class_names(dataset: IndexedDataset) -> list[str] | None:
    base, _ = _base(dataset, 0) if len(dataset) else (dataset, 0)
    return getattr(base.dataset, "classes", None)


def display_image(dataset: IndexedDataset, position: int, size: int = 64) -> Image.Image:
    """The example at ``position`` as a ``size`` x ``size`` RGB image, without the training or test
    transform (no normalisation, no augmentation): small images are enlarged with nearest
    neighbour, so pixels stay visible; larger ones are centre-cropped to a square and resized."""
    base, index = _base(dataset, position)
    source = base.dataset
    if isinstance(source, DigitsDataset):
        pixels = source.images[index].squeeze(0).clamp(0, 1).mul(255).round().byte().numpy()
        image = Image.fromarray(255 - pixels, mode="L")  # dark ink on white, as the digits were written
    elif isinstance(source, GreyImages):
        pixels = source.images[index].numpy()
        image = Image.fromarray(255 - pixels if source.inverted else pixels, mode="L")
    else:
        raw = copy.copy(source)
        raw.transform = None
        if hasattr(raw, "transforms"):
            raw.transforms = None
        image = raw[index][0]
        if not isinstance(image, Image.Image):
            raise TypeError(f"cannot display a {type(image).__name__} of {type(source).__name__}")
    image = image.convert("RGB")
    if max(image.size) <= size:
        return image.resize((size, size), Image.Resampling.NEAREST)
    return ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def choose_queries(
    dataset: IndexedDataset, count: int, seed: int, query_index: Sequence[int] | None = None
) -> Tensor:
    """Positions in ``dataset`` of the queries: ``query_index`` (indices into the full split) or
    ``count`` distinct positions drawn with ``seed``."""
    if query_index:
        lookup = {int(index): position for position, index in enumerate(dataset_indices(dataset).tolist())}
        missing = [index for index in query_index if index not in lookup]
        if missing:
            raise ExportError(
                f"--query-index {missing} not in the query split (its {len(dataset)} examples"
                f"{'' if not isinstance(dataset, ClassSubset) else ' of the chosen classes'})"
            )
        return torch.tensor([lookup[index] for index in query_index])
    if not 1 <= count <= len(dataset):
        raise ExportError(f"--queries must be in [1, {len(dataset)}], got {count}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(len(dataset), generator=generator)[:count].sort().values


@torch.no_grad()
def retrieve(
    model: nn.Module,
    queries: Tensor,
    bank: Tensor,
    k: int,
    device: torch.device,
    *,
    exclude: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Top-``k`` (similarity, bank row) of each query image by the model's features."""
    features = model.eval()(queries.to(device)).float()
    values, rows = bank_topk(
        features,
        bank.to(device=device, dtype=torch.float32),
        min(k, bank.shape[0]),
        exclude=exclude,
        backend=backend,
    )
    return values.cpu(), rows.cpu()


def _label_text(names: list[str] | None, label: int) -> str:
    return names[label] if names is not None and 0 <= label < len(names) else str(label)


def write_html(
    path: Path,
    *,
    title: str,
    query_set: IndexedDataset,
    bank_set: IndexedDataset,
    queries: Tensor,
    models: Sequence[ModelRows],
    thumb: int,
    notes: Sequence[str],
) -> None:
    names = class_names(bank_set)
    query_indices, bank_indices = dataset_indices(query_set), dataset_indices(bank_set)
    cache: dict[tuple[int, int], str] = {}

    def image(which: int, dataset: IndexedDataset, position: int) -> str:
        if (which, position) not in cache:
            cache[which, position] = _data_uri(display_image(dataset, position, thumb))
        return cache[which, position]

    rows = []
    for q, position in enumerate(queries.tolist()):
        label = int(query_set.targets[position])
        for m, model in enumerate(models):
            cells = []
            hits = 0
            for value, row in zip(model.values[q].tolist(), model.positions[q].tolist(), strict=True):
                if row < 0:
                    continue
                neighbour = int(bank_set.targets[row])
                correct = neighbour == label
                hits += correct
                tooltip = f"train #{int(bank_indices[row])}, class {_label_text(names, neighbour)}"
                cells.append(
                    f'<td class="hit {"correct" if correct else "wrong"}" data-label="{neighbour}" '
                    f'title="{html.escape(tooltip)}">'
                    f'<img src="{image(1, bank_set, row)}" alt="train {int(bank_indices[row])}">'
                    f"<div>{'&#10003;' if correct else '&#10007;'} {value:.3f}</div></td>"
                )
            query_cell = (
                f'<td class="query" rowspan="{len(models)}"><img src="{image(0, query_set, position)}" '
                f'alt="query {int(query_indices[position])}"><div>#{int(query_indices[position])}<br>'
                f"{html.escape(_label_text(names, label))}</div></td>"
                if m == 0
                else ""
            )
            rows.append(
                f'<tr class="row{" first" if m == 0 else ""}" data-query="{int(query_indices[position])}" '
                f'data-label="{label}" data-model="{html.escape(model.name)}" data-correct="{hits}">'
                f'{query_cell}<th class="model">{html.escape(model.name)}<br>{hits}/{len(cells)}</th>'
                f"{''.join(cells)}</tr>"
            )
    note_html = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 13px sans-serif; margin: 16px; }}
table {{ border-collapse: collapse; }}
td, th {{ padding: 2px; text-align: center; vertical-align: top; }}
tr.first td, tr.first th {{ border-top: 1px solid #999; }}
td img {{ display: block; width: {thumb}px; height: {thumb}px; border: 3px solid transparent; }}
td.query img {{ border-color: #333; }}
td.correct img {{ border-color: {CORRECT}; }}
td.wrong img {{ border-color: {WRONG}; }}
td.correct div {{ color: {CORRECT}; }}
td.wrong div {{ color: {WRONG}; }}
th.model {{ font-weight: normal; writing-mode: vertical-rl; transform: rotate(180deg); }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<ul>{note_html}</ul>
<table id="neighbors">
{chr(10).join(rows)}
</table>
<script>
// Reports in the title how many images decoded, so a headless browser can check the page.
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  const loaded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  const rows = document.querySelectorAll("tr.row").length;
  document.title = `loaded ${{loaded}}/${{images.length}} images, ${{rows}} rows`;
}});
</script>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")


def write_png(
    path: Path,
    *,
    query_set: IndexedDataset,
    bank_set: IndexedDataset,
    queries: Tensor,
    models: Sequence[ModelRows],
    thumb: int,
) -> None:
    """The same grid as the page: per row the query, a gap, then the retrievals framed green or
    red with the similarity under each."""
    border, text_height, label_width, gap = 3, 14, 90, 12
    cell_w, cell_h = thumb + 2 * border + 2, thumb + 2 * border + text_height
    k = max(model.values.shape[1] for model in models)
    width = label_width + cell_w + gap + k * cell_w
    height = len(queries) * len(models) * cell_h + (len(queries) - 1) * 4
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    y = 0
    for q, position in enumerate(queries.tolist()):
        label = int(query_set.targets[position])
        for model in models:
            draw.text((2, y + cell_h // 2 - 6), model.name[:14], fill="black", font=font)
            canvas.paste(
                ImageOps.expand(display_image(query_set, position, thumb), border, "#333333"),
                (label_width, y),
            )
            x = label_width + cell_w + gap
            for value, row in zip(model.values[q].tolist(), model.positions[q].tolist(), strict=True):
                if row < 0:
                    continue
                color = CORRECT if int(bank_set.targets[row]) == label else WRONG
                canvas.paste(ImageOps.expand(display_image(bank_set, row, thumb), border, color), (x, y))
                draw.text((x + 2, y + thumb + 2 * border), f"{value:.3f}", fill=color, font=font)
                x += cell_w
            y += cell_h
        y += 4
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
