"""``python -m snca_ext.neighbors``: the page's rows are the true top-k by the network's features,
marked by class; queries by seed or index; the PNG grid; and the page rendered by a real headless
browser (Debian's ``chromium``; the test is skipped when it is not installed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from helpers.models import forward_all
from PIL import Image

from snca_ext.apps.data import build_data
from snca_ext.apps.export import run as export
from snca_ext.apps.feature_files import load_features, write_safetensors
from snca_ext.apps.neighbors import run
from snca_ext.apps.trained import load_trained_model

FAST = ["--threads", "1", "--no-progress"]
K = 20
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def checkpoints(holdout_runs) -> dict[str, Path]:
    """The checkpoints of the session's holdout runs (tests/apps/conftest.py), one per loss."""
    return {loss: out / "checkpoint.pt" for loss, out in holdout_runs.items()}


class _Page(HTMLParser):
    """The rows of the page: per row its attributes and its cells' (class, data-label, title)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.images = 0
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "tr" and "row" in attributes.get("class", "").split():
            self.rows.append({**attributes, "cells": []})
        elif tag == "td" and "hit" in attributes.get("class", "").split():
            self.rows[-1]["cells"].append(attributes)
        elif tag == "img":
            self.images += 1
            assert attributes["src"].startswith("data:image/png;base64,")  # self-contained
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        self._in_title = self._in_title and tag != "title"

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def _page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _neighbors(checkpoint: Path, out: Path, *extra: str) -> int:
    return run(
        ["--checkpoint", str(checkpoint), "--out", str(out), "--threads", "1", "--no-progress", *extra]
    )


def test_rows_are_the_true_top_k_marked_by_class(checkpoints, tmp_path):
    out = tmp_path / "nn.html"
    assert _neighbors(checkpoints["snca"], out, "--queries", "4", "--seed", "3") == 0
    page = _page(out)
    assert len(page.rows) == 4 and page.images == 4 * (K + 1)
    # The same retrieval by brute force: every bank row's similarity, sorted.
    model, _ = load_trained_model(checkpoints["snca"])
    bundle = build_data("digits")
    bank = forward_all(model, bundle.train_plain)
    for row in page.rows:
        query = int(row["data-query"])
        label = int(bundle.test.targets[query])
        assert int(row["data-label"]) == label
        with torch.no_grad():
            feature = model(bundle.test[query][0][None])
        expected = (feature @ bank.T).flatten().topk(K).indices
        shown = [int(re.match(r"train #(\d+),", cell["title"]).group(1)) for cell in row["cells"]]
        assert shown == expected.tolist()
        marks = [cell["class"].split()[1] for cell in row["cells"]]
        assert marks == ["correct" if bundle.train_plain.targets[i] == label else "wrong" for i in shown]
        assert int(row["data-correct"]) == marks.count("correct")
    assert (tmp_path / "nn.png").is_file()


def test_queries_by_seed_or_index_and_compare_rows(checkpoints, tmp_path):
    def queries(name: str, *extra: str) -> list[int]:
        assert _neighbors(checkpoints["snca"], tmp_path / f"{name}.html", "--k", "5", *extra) == 0
        return [int(row["data-query"]) for row in _page(tmp_path / f"{name}.html").rows]

    assert queries("a", "--seed", "1") == queries("b", "--seed", "1")
    assert queries("a", "--seed", "1") != queries("c", "--seed", "2")
    assert queries("d", "--query-index", "17,5,300") == [17, 5, 300]
    out = tmp_path / "vs.html"
    compare = ["--compare", str(checkpoints["softmax"]), "--names", "SNCA,softmax", "--queries", "3"]
    assert _neighbors(checkpoints["snca"], out, *compare) == 0
    page = _page(out)
    assert [row["data-model"] for row in page.rows] == ["SNCA", "softmax"] * 3
    assert page.images == 3 * (1 + 2 * K)  # the query image once per query
    assert page.title == "Nearest neighbours: SNCA vs softmax"


def test_novel_classes_and_training_queries_exclude_themselves(checkpoints, tmp_path):
    out = tmp_path / "novel.html"
    extra = ["--classes", "novel", "--query-split", "train", "--queries", "5"]
    assert _neighbors(checkpoints["snca"], out, *extra) == 0
    for row in _page(out).rows:
        assert int(row["data-label"]) in range(5, 10)
        shown = [int(re.match(r"train #(\d+),", cell["title"]).group(1)) for cell in row["cells"]]
        assert int(row["data-query"]) not in shown and len(set(shown)) == K
        assert all(int(cell["data-label"]) in range(5, 10) for cell in row["cells"])


def test_png_grid_has_one_row_per_query_and_model(checkpoints, tmp_path):
    out = tmp_path / "grid.html"
    compare = ["--compare", str(checkpoints["softmax"]), "--queries", "2", "--thumb", "32"]
    assert _neighbors(checkpoints["snca"], out, *compare, "--png", str(tmp_path / "g.png")) == 0
    image = Image.open(tmp_path / "g.png").convert("RGB")
    cell_w, cell_h = 32 + 6 + 2, 32 + 6 + 14
    assert image.size == (90 + cell_w + 12 + K * cell_w, 4 * cell_h + 4)
    colors = {color for _, color in image.getcolors(maxcolors=1 << 16)}
    assert (0x1A, 0x98, 0x50) in colors  # green frames: correct retrievals exist


def test_exported_bank_gives_the_same_page(checkpoints, tmp_path, capsys):
    bank = tmp_path / "bank.safetensors"
    assert export(["--checkpoint", str(checkpoints["snca"]), "--out", str(bank), "--no-progress"]) == 0
    assert _neighbors(checkpoints["snca"], tmp_path / "a.html", "--queries", "3") == 0
    assert (
        _neighbors(checkpoints["snca"], tmp_path / "b.html", "--queries", "3", "--bank-features", str(bank))
        == 0
    )
    first, second = _page(tmp_path / "a.html").rows, _page(tmp_path / "b.html").rows
    assert [row["cells"] for row in first] == [row["cells"] for row in second]
    # A bank of other images (the novel classes only) is refused, not silently misread.
    novel = tmp_path / "novel.safetensors"
    argv = [
        "--checkpoint",
        str(checkpoints["snca"]),
        "--out",
        str(novel),
        "--classes",
        "novel",
        "--no-progress",
    ]
    assert export(argv) == 0
    capsys.readouterr()
    assert _neighbors(checkpoints["snca"], tmp_path / "c.html", "--bank-features", str(novel)) == 2
    assert "are not the 1347 training images of --classes all" in capsys.readouterr().err
    # The right rows with features of another width (another network's) are refused too.
    narrow = tmp_path / "narrow.safetensors"
    exported = load_features(bank)
    write_safetensors(
        narrow, [exported["features"][:, :7]], 1347, 7, exported["labels"], exported["indices"], {}
    )
    assert _neighbors(checkpoints["snca"], tmp_path / "d.html", "--bank-features", str(narrow)) == 2
    assert "holds features of shape (1347, 7), but the network's are [N, 128]" in capsys.readouterr().err


def test_an_unwritable_out_fails_up_front(checkpoints, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _neighbors(checkpoints["snca"], blocker / "nn.html") == 2
    assert f"--out: {blocker} cannot be written" in capsys.readouterr().err


def test_bad_query_index_exits_2(checkpoints, tmp_path, capsys):
    assert _neighbors(checkpoints["snca"], tmp_path / "x.html", "--query-index", "5000") == 2
    assert "--query-index [5000] not in the query split" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


# CI installs chromium (.ci/run), so there a missing browser is a failure, not a skip.
@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (apt-get install chromium)",
)
def test_page_renders_in_headless_chromium(checkpoints, tmp_path):
    out = tmp_path / "nn.html"
    compare = ["--compare", str(checkpoints["softmax"]), "--queries", "3", "--names", "SNCA,softmax"]
    assert _neighbors(checkpoints["snca"], out, *compare) == 0
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ]

    def browse(profile: str, *extra: str) -> subprocess.CompletedProcess:
        argv = [*flags, f"--user-data-dir={tmp_path / profile}", *extra, out.as_uri()]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)

    # The page's script writes how many images decoded into the title once the page has loaded.
    dom = browse("dom", "--dump-dom").stdout
    expected_images = 3 * (1 + 2 * K)
    assert f"<title>loaded {expected_images}/{expected_images} images, 6 rows</title>" in dom
    shot = tmp_path / "shot.png"
    browse("shot", f"--screenshot={shot}", "--window-size=1400,900")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 900)
    colors = image.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # not a blank page: text, digits and frames
    counts = {color: count for count, color in colors}
    # Framed thumbnails were drawn: the green and red borders cover many pixels.
    assert counts.get((0x1A, 0x98, 0x50), 0) > 1000 and counts.get((0xD7, 0x30, 0x27), 0) > 200
