"""Report files and pictures: JSON, paper-layout Markdown, self-contained HTML, heatmap, colouring, overlays."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from denseclip.metrics import accumulate, summarize
from denseclip.report import table1_markdown, table3_markdown, write_report
from denseclip.visualize import IGNORE_COLOR, colorize, comparison_grid, default_palette, overlay

NAMES = ["background", "cat", "a|b <i>odd</i>"]
PALETTE = np.array([[0, 0, 0], [200, 10, 10], [10, 200, 10]], dtype=np.uint8)


def test_voc_palette_has_the_standard_colours():
    palette = default_palette(256)
    assert palette.dtype == np.uint8 and palette.shape == (256, 3)
    # VOC colour map: aeroplane (1), bird (3), person (15), and 255 as drawn in VOC's void boundaries
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[3].tolist() == [128, 128, 0]
    assert palette[15].tolist() == [192, 128, 128]
    assert palette[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in palette}) == 256


def test_colorize_maps_labels_and_out_of_range():
    out = colorize(np.array([[0, 1], [2, 255]]), PALETTE)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 1].tolist() == [200, 10, 10] and out[1, 0].tolist() == [10, 200, 10]
    assert tuple(out[1, 1]) == IGNORE_COLOR


def test_overlay_blends_and_adds_a_legend_of_present_classes():
    image = np.full((40, 50, 3), 100, np.uint8)
    labels = np.zeros((40, 50), np.int64)
    labels[:, 25:] = 1
    labels[0, 0] = 255
    out = np.asarray(overlay(image, labels, NAMES, PALETTE, alpha=0.25))
    assert out.shape[0] >= 40 and out.shape[1] > 50  # legend to the right
    assert out[10, 30].tolist() == [125, 78, 78]  # 0.75 * 100 + 0.25 * (200, 10, 10), rounded
    assert out[0, 0].tolist() == [100, 100, 100]  # ignore pixel untinted
    legend = out[:, 50:].reshape(-1, 3)
    assert (legend == [200, 10, 10]).all(axis=1).any()  # cat swatch
    assert not (legend == [10, 200, 10]).all(axis=1).any()  # class 2 absent -> not in the legend
    with pytest.raises(ValueError, match="image is 50x40 but labels are 3x2"):
        overlay(image, np.zeros((2, 3), np.int64), NAMES, PALETTE)


def test_comparison_grid_has_three_panels_or_two_without_image():
    gt = np.zeros((30, 20), np.uint8)
    pred = np.ones((30, 20), np.uint8)
    with_image = comparison_grid(np.zeros((30, 20, 3), np.uint8), gt, pred, NAMES, PALETTE)
    without = comparison_grid(None, gt, pred, NAMES, PALETTE)
    scale = 9  # 30 rows enlarged to at least MIN_PANEL_HEIGHT = 256 rows
    assert with_image.width - without.width == 20 * scale + 4  # one panel and its gap
    assert with_image.height > 30 * scale  # titles above the panels
    pixels = np.asarray(with_image)
    assert pixels[-1, 20 * scale + 4].tolist() == [0, 0, 0]  # gt panel: background colour
    assert pixels[-1, 2 * (20 * scale + 4)].tolist() == [200, 10, 10]  # pred panel: cat colour


@pytest.fixture
def report(tmp_path):
    gt = np.array([[0, 1, 1], [2, 2, 255]], np.uint8)
    pred = np.array([[0, 1, 0], [2, 1, 0]], np.uint8)
    conf = accumulate([("k", pred, gt)], 3)
    summary = summarize(conf, NAMES, unseen=["a|b <i>odd</i>"])
    summary.update(dataset="toy", method="DenseCLIP", inputs={"pred": "p/", "gt": "g/"})
    image = np.zeros((2, 3, 3), np.uint8)
    (tmp_path / "out" / "overlays").mkdir(parents=True)
    (tmp_path / "out" / "overlays" / "old-run.png").write_bytes(b"stale")
    paths = write_report(tmp_path / "out", summary, conf, NAMES, PALETTE,
                         samples=[("../../escape/me", image, gt, pred), ("a/b", None, gt, pred)])
    return tmp_path / "out", paths, summary


def test_report_files(report):
    out, paths, summary = report
    assert json.loads(paths["report"].read_text()) == summary
    # overlay names are sanitised keys: nothing lands outside out/overlays
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a__b.png", "escape__me.png"]
    assert not (out.parent / "escape").exists()
    tables = paths["tables"].read_text()
    # background: TP 1, GT 1, pred 2 -> 1/2; cat: TP 1, GT 2, pred 2 -> 1/3; class 2: TP 1, GT 2, pred 1 -> 1/2
    # S = (50 + 33.33) / 2, U = 50, mIoU = (50 + 33.33 + 50) / 3, hIoU = 2 S U / (S + U)
    assert "| DenseCLIP | 41.67 | 50.00 | 44.44 | 45.45 |" in tables
    assert "| a\\|b <i>odd</i> | unseen | 50.00 | 50.00 | 2 |" in tables  # the '|' in a name is escaped


def test_html_is_self_contained_and_escaped(report):
    _, paths, _ = report
    page = paths["html"].read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)  # heatmap + 2
    assert "href=" not in page and "http" not in page
    assert "<i>odd</i>" not in page and "&lt;i&gt;odd&lt;/i&gt;" in page
    assert "44.44" in page and "rgb(200,10,10)" in page


def test_confusion_heatmap_is_row_normalised(report):
    out, _, _ = report
    heatmap = Image.open(out / "confusion.png")
    assert heatmap.format == "PNG" and heatmap.width >= 400


def test_paper_tables_combine_runs():
    a = {"miou": 10.0, "miou_seen": 20.0, "miou_unseen": 5.0, "hiou": 8.0}
    results = {"MaskCLIP": {"voc": a, "context": a}, "MaskCLIP+": {"voc": {**a, "miou": 50.0}}}
    t1 = table1_markdown(results).splitlines()
    assert t1[0] == ("| Method | voc S | voc U | voc mIoU | voc hIoU | context S | context U | context mIoU "
                     "| context hIoU |")
    assert t1[3] == "| MaskCLIP+ | 20.00 | 5.00 | 50.00 | 8.00 | - | - | - | - |"
    assert table3_markdown(results).splitlines()[2] == "| MaskCLIP | 10.00 | 10.00 |"
