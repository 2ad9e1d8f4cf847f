"""Report files and pictures: JSON, paper-layout Markdown, self-contained HTML, heatmap, class colours,
overlays, legends and the page that compares methods."""

import colorsys
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denseclip.datasets import get_dataset
from denseclip.metrics import accumulate, summarize
from denseclip.report import table1_markdown, table3_markdown, write_comparison, write_report
from denseclip.visualize import (
    IGNORE_COLOR,
    class_palette,
    colorize,
    comparison_grid,
    default_palette,
    legend_name,
    overlay,
)

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


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360


def test_background_is_black_wherever_it_stands_and_colour_words_give_the_colour():
    names = ["yellow circle", "red star", "cat", "red circle", "dark blue car", "background"]
    palette = class_palette(names)
    assert palette.dtype == np.uint8 and palette.shape == (6, 3)
    assert palette[5].tolist() == [0, 0, 0]  # background last: still black
    assert 40 <= _hue(palette[0]) <= 65  # yellow
    assert _hue(palette[1]) <= 10 and _hue(palette[3]) <= 10  # both red ...
    assert palette[1].tolist() != palette[3].tolist()  # ... in two shades, so the classes stay apart
    assert 200 <= _hue(palette[4]) <= 250  # blue
    assert palette[2].any() and len({tuple(c) for c in palette}) == 6  # no other class is black
    with_background_first = class_palette(["background", "cat", "dog"])
    assert with_background_first[0].tolist() == [0, 0, 0] and with_background_first[1:].any(axis=1).all()


def test_synthetic_world_reads_at_a_glance_and_presets_keep_their_palettes():
    synthetic = get_dataset("synthetic")
    hues = {"red": (0, 10), "green": (100, 140), "blue": (200, 250), "yellow": (40, 65)}
    for name, colour in zip(synthetic.class_names, synthetic.palette):
        if name == "background":
            assert colour.tolist() == [0, 0, 0]
        else:
            low, high = hues[name.split()[0]]
            assert low <= _hue(colour) <= high, (name, colour)
    assert len({tuple(c) for c in synthetic.palette}) == synthetic.num_classes
    voc = get_dataset("voc")
    assert voc.palette.tolist() == default_palette(21).tolist()  # VOC's colour map, background black
    coco = get_dataset("coco_stuff")
    standard = json.loads((Path(__file__).parents[1] / "denseclip" / "data" / "palettes" / "coco_stuff.json")
                          .read_text())["colors"]
    assert coco.palette.tolist() == standard and len(standard) == 171
    # an orange (the fruit) keeps its COCO-Stuff colour: presets are not recoloured by their names
    assert coco.palette[coco.class_index("orange")].tolist() == standard[coco.class_index("orange")]


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


def test_overlay_leaves_background_untinted_wherever_it_stands():
    names = ["cat", "background"]
    palette = class_palette(names)
    image = np.full((20, 20, 3), 100, np.uint8)
    labels = np.ones((20, 20), np.int64)
    labels[:, :10] = 0
    out = np.asarray(overlay(image, labels, names, palette, alpha=0.5))
    assert out[5, 15].tolist() == [100, 100, 100]  # background (label 1): the image as it is
    assert out[5, 5].tolist() != [100, 100, 100]  # cat: tinted


def test_legends_mark_unseen_classes():
    assert legend_name("cat", {"cat"}) == "cat (unseen)" and legend_name("dog", {"cat"}) == "dog"
    gt = np.zeros((30, 20), np.uint8)
    pred = np.ones((30, 20), np.uint8)
    plain = comparison_grid(None, gt, pred, NAMES, PALETTE)
    marked = comparison_grid(None, gt, pred, NAMES, PALETTE, unseen={"cat"})
    assert marked.width > plain.width  # the legend holds the longer "cat (unseen)"


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


class _Page(HTMLParser):
    """The tables (as rows of cell texts), links and image sources of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tables, self.links, self.images, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_comparison_page_shows_every_method_per_class_and_the_same_scenes(tmp_path):
    gt = np.array([[0, 1, 1], [2, 2, 255]], np.uint8)
    predictions = {"good": gt.copy(), "bad": np.zeros_like(gt)}
    summaries = {}
    for method, pred in predictions.items():
        summaries[method] = summarize(accumulate([("k", pred, gt)], 3), NAMES, unseen=["cat"])
    image = np.zeros((2, 3, 3), np.uint8)
    paths = write_comparison(tmp_path, summaries, NAMES, PALETTE, [("scene/1", image, gt, predictions)],
                             title="two methods", labels={"good": "Good <b>", "bad": "Bad"},
                             pages={"good": "good/index.html"},
                             tables=[("Timings", ["stage", "seconds"], [["train", "1.0"]])])
    page = _Page()
    page.feed(paths["html"].read_text())
    methods, per_class, timings = page.tables
    assert methods[0][:4] == ["Method", "mIoU", "mIoU(S)", "mIoU(U)"]
    assert [row[0] for row in methods[1:]] == ["Good <b>", "Bad"]  # escaped, in the given order
    assert methods[1][1] == "100.00" and float(methods[2][1]) < 100
    assert per_class[0] == ["Class", "Split", "Good <b>", "Bad"]
    assert ["cat", "unseen", "100.00", "0.00"] in per_class and per_class[1][1] == "seen"
    assert timings[1] == ["train", "1.0"]
    assert page.links == ["good/index.html"]  # the method without a page is not linked
    assert page.images == ["scenes/scene__1.png"] and (tmp_path / page.images[0]).is_file()
    assert Image.open(tmp_path / page.images[0]).width > 3 * Image.open(tmp_path / page.images[0]).height


HOSTILE = '"><script>alert(1)</script><img src=x onerror=alert(2)>'


class _Tags(HTMLParser):
    """Every start tag of a page and every attribute value."""

    def __init__(self):
        super().__init__()
        self.tags, self.attribute_names = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attribute_names += [name for name, _ in attrs]


def test_no_field_of_a_report_or_comparison_page_can_inject_markup(tmp_path):
    gt = np.array([[0, 1, 1], [2, 2, 255]], np.uint8)
    names = ["background", HOSTILE, "cow"]
    summary = summarize(accumulate([("k", gt, gt)], 3), names, unseen=[HOSTILE])
    summary.update(dataset=HOSTILE, method=HOSTILE, inputs={HOSTILE: HOSTILE, "gt": [HOSTILE]})
    report = write_report(tmp_path / "one", summary, accumulate([("k", gt, gt)], 3), names, PALETTE,
                          samples=[(HOSTILE, None, gt, gt)], reference=HOSTILE)
    comparison = write_comparison(tmp_path / "many", {HOSTILE: summary}, names, PALETTE,
                                  [(HOSTILE, np.zeros((2, 3, 3), np.uint8), gt, {HOSTILE: gt})],
                                  title=HOSTILE, notes=HOSTILE, labels={HOSTILE: HOSTILE},
                                  pages={HOSTILE: HOSTILE}, tables=[(HOSTILE, [HOSTILE], [[HOSTILE]])])
    for page, pictures in ((report["html"], 2), (comparison["html"], 1)):  # heatmap + overlay; one scene
        text = page.read_text()
        tags = _Tags()
        tags.feed(text)
        assert "script" not in tags.tags and tags.tags.count("img") == pictures
        assert not [name for name in tags.attribute_names if name.startswith("on")]
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # shown as text, not dropped
