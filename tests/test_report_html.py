"""report.html and compare.html: self-contained pages that show what report.md and compare.md show."""

import base64
import html
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from ssdd import artifacts, distilled_set, layout
from ssdd.compare import comparison
from ssdd.data.dataset import ImageSet, save_dataset
from ssdd.report_html import write_comparison, write_reports

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(accs: dict[str, list[float]], target="digits", protocol="linear", fraction=0.01):
    return [{"method": m, "target": target, "protocol": protocol, "label_fraction": fraction, "seed": s,
             "accuracy": a, "arch": "convnet", "group": "convnet"} for m, values in accs.items()
            for s, a in enumerate(values)]


RESULTS = _rows({"krr_st": [0.50, 0.52, 0.47], "mkdt": [0.56, 0.58, 0.55], "random_subset": [0.49, 0.53, 0.47],
                 "no_pretrain": [0.30, 0.31, 0.29], "full_ssl": [0.60, 0.64, 0.61]}) + \
    _rows({"krr_st": [0.90, 0.91], "random_subset": [0.80, 0.82]}, protocol="finetune", fraction=1.0)


def tiny_run(out: Path) -> Path:
    """A run folder as the pipeline leaves it, small: results, logs, a prepared source and four sets written
    by the real writers. krr_st starts from random_subset's draw, mkdt from other source images, kmeans is a
    selection (its images are its start)."""
    g = torch.Generator().manual_seed(0)
    source = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8, generator=g)
    save_dataset(layout.source_path(out, "train"), ImageSet(source, None, [], "tiny"))
    artifacts.write_json(layout.results_paths(out)[0], RESULTS)
    artifacts.write_json(layout.pretrain_log_path(out), {"epoch_loss": {"krr_st/seed0": [1.0, 0.5, 0.25]}})
    artifacts.write_json(layout.stage_config_path(out, "evaluate"), {"config": {"seed": 0, "note": "<b>&</b>"}})
    draw, other = [4, 1, 7, 9], [0, 2, 3, 5]
    check = {"init": 0.4, "distilled": 0.3, "other_random_subset": 0.45, "note": "three fresh models"}
    sets = {"random_subset": (source[draw] / 255, draw, {}),
            "krr_st": (source[draw] / 255 + 0.2 * torch.rand(4, 1, 8, 8, generator=g), draw,
                       {"losses": [3.0, 2.0, 1.5, 1.0], "heldout_check": check}),
            "mkdt": (source[other] / 255 - 0.2, other, {"losses": [2.0, 1.0, 0.8, 0.7]}),
            "kmeans": (source[other] / 255, other, {})}
    for name, (x, index, meta) in sets.items():
        distilled_set.save_arrays(layout.distilled_path(out, name, 0), x, torch.zeros(4, 2),
                                  {"method": name, "init_index": index, "image_space": "reference", **meta})
    return out


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs).get("src", ""))

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def assert_self_contained(path: Path) -> _Page:
    """Nothing a browser would fetch: every image a PNG data URI, no script, style sheet link, font or URL."""
    raw = path.read_text()
    page = parse(path)
    assert page.imgs and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    for src in page.imgs:
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG)
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert not re.search(r"https?://|url\(|@import|src=\"(?!data:)", raw)
    return page


def md_cells(md: str) -> list[str]:
    """Every table cell of a Markdown text (rule rows and bold marks dropped)."""
    cells = []
    for line in md.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells += [c.strip().replace("**", "").strip("_") for c in line.strip("|").split("|")]
    return [c for c in cells if c]


def test_report_html_shows_what_report_md_shows(tmp_path):
    out = tiny_run(tmp_path / "run")
    md_path = write_reports(out, methods=["krr_st", "mkdt", "random_subset"], interval_note="label draws")
    md = md_path.read_text()
    page = assert_self_contained(layout.report_html_path(out))
    # the figures report.md links, the same files inline, in the same order
    linked = re.findall(r"\]\(figures/([^)]+)\)", md)
    assert linked == ["paired_differences.png", "distilled_vs_initial.png", "mkdt_vs_initial.png",
                      "distill_loss.png", "pretrain_loss.png"]
    assert [base64.b64decode(src.split(",", 1)[1]) for src in page.imgs] == \
        [(layout.figures_dir(out) / name).read_bytes() for name in linked]
    text = html.unescape(" ".join(page.text))
    missing = [c for c in md_cells(md) if c not in text]
    assert not missing, missing  # every number and label of the Markdown tables is on the page
    for sentence in ("krr_st vs random_subset is within seed noise", "three fresh models",
                     "kmeans (its images are the real images it starts from", "What the interval covers: label draws."):
        assert sentence in md and sentence in text
    assert "source images it started from" in md  # mkdt's start is read from the source by its init_index
    raw = layout.report_html_path(out).read_text()
    assert '"note": "<b>&</b>"' in text and "&lt;b&gt;&amp;&lt;/b&gt;" in raw and "<b>" not in raw  # escaped


def test_report_html_without_sets_or_baselines(tmp_path):
    artifacts.write_json(tmp_path / "results.json", _rows({"krr_st": [0.5], "full_ssl": [0.7]}))
    write_reports(tmp_path)
    page = parse(layout.report_html_path(tmp_path))
    text = " ".join(page.text)
    assert not page.imgs and "not compared" in text and "No distilled set in this folder." in text


def test_compare_html_shows_what_compare_md_shows(tmp_path):
    out = tiny_run(tmp_path / "run")
    write_reports(out)
    paper = tmp_path / "paper.csv"
    paper.write_text("method,target,protocol,label_fraction,accuracy\nmkdt,digits,linear,0.01,44.36\n")
    comp = comparison(RESULTS, ["krr_st", "mkdt", "random_subset", "no_pretrain", "full_ssl"], paper_table=paper,
                      storage={"krr_st": 264})
    md = write_comparison(out, comp, {"krr_st": {"distill": 12.0}}, "label draws").read_text()
    path = layout.compare_html_path(out)
    page = assert_self_contained(path)
    assert len(page.imgs) == 1 and base64.b64decode(page.imgs[0].split(",", 1)[1]) == (out / "compare.png").read_bytes()
    text = html.unescape(" ".join(page.text))
    missing = [c for c in md_cells(md) if c not in text]
    assert not missing, missing
    raw = path.read_text()
    assert '<tr class="paper">' in raw and "<strong>" in raw and 'href="report.html"' in raw
    assert "capture" in text and "Fieller" in text


# ---- in a browser ------------------------------------------------------------------------------

CHECK = """<script>(function () {
  function check() {
    var flags = Array.prototype.map.call(document.images, function (i) {
      return i.complete && i.naturalWidth > 0 ? "1" : "0"; });
    var out = document.createElement("pre"); out.id = "ssdd-img-check"; out.textContent = "[" + flags.join("") + "]";
    document.body.appendChild(out);
  }
  if (document.readyState === "complete") check(); else window.addEventListener("load", check);
})();</script>"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND"]  # nothing on the network resolves


def chromium() -> str:
    found = os.environ.get("SSDD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium not found (Debian: apt-get install chromium; .ci/run installs it when it can)")
    return found


def loaded_images(browser: str, page: Path, tmp: Path) -> str:
    """The page as Chromium renders it, with a check appended: one flag per <img>, 1 when it loaded."""
    probe = tmp / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    profile = tmp / f"profile-{page.stem}"
    done = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="ssdd-img-check">\[([01]*)\]</pre>', done.stdout)
    assert found, f"chromium rendered no check (exit {done.returncode}): {done.stderr[-2000:]}"
    return found.group(1)


@pytest.mark.slow
def test_pages_render_in_chromium_with_every_image(tmp_path):
    browser = chromium()
    out = tiny_run(tmp_path / "run")
    write_reports(out)
    write_comparison(out, comparison(RESULTS, ["krr_st", "mkdt", "random_subset", "full_ssl"]))
    for path in (layout.report_html_path(out), layout.compare_html_path(out)):
        expected = len(parse(path).imgs)
        assert loaded_images(browser, path, tmp_path) == "1" * expected, path.name
    # the check can fail: a broken image is reported as not loaded
    broken = tmp_path / "broken.html"
    broken.write_text(layout.compare_html_path(out).read_text().replace("base64,iVBOR", "base64,AAAA", 1))
    assert loaded_images(browser, broken, tmp_path) == "0"
