"""`psp report`: the page's content (parsed), odd tables, and a real headless Chromium loading it offline."""
from __future__ import annotations

import base64
import datetime as _dt
import io
import os
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from deltalake import write_deltalake
from output_tables import commit_table
from PIL import Image

import schemas

N_STYLES = 8
T0 = _dt.datetime(2026, 11, 1, 12, 0, tzinfo=_dt.timezone.utc)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _crop(photo: np.ndarray, rng, size=64) -> np.ndarray:
    y, x = rng.integers(0, photo.shape[0] - 200, 2)
    return np.asarray(Image.fromarray(photo[y:y + 200, x:x + 200]).resize((size, size)))


def make_output(tmp_path, astronaut, n_ok=10, metrics=True, errors=True) -> str:
    """An output table like psp invert writes, with real images, two runs and a mix of failures;
    inputs are real files (one missing)."""

    photo = np.asarray(astronaut)
    rng = np.random.default_rng(0)
    inputs = tmp_path / "inputs"
    inputs.mkdir(exist_ok=True)
    rows = []
    for i in range(n_ok):
        src = inputs / f"face{i}.jpg"
        if i != 3:  # face3's input has gone since the run
            Image.fromarray(_crop(photo, rng, 160)).save(src, quality=90)
        row = dict(
            source_uri=str(src), status="ok", task="ffhq_frontalize" if i % 4 == 0 else "ffhq_encode",
            face_score=float(rng.uniform(0.5, 2.5)),
            w_plus=(rng.standard_normal((N_STYLES, 512)) * 0.3 + (i % 4 == 0)).astype(np.float32),
            output_image=_png(_crop(photo, rng)), image_format="png",
            aligned_image=_png(_crop(photo, rng)) if i % 2 == 0 else None,
            mix_images=[_png(_crop(photo, rng)) for _ in range(3)] if i < 2 else None,
            checkpoint_sha256="ab" * 32, run_id="run-a" if i < 6 else "run-b",
            processed_at=T0 + _dt.timedelta(hours=0 if i < 6 else 24, seconds=i),
        )
        if metrics:
            row.update(mse=float(rng.uniform(0.001, 0.1)), psnr=float(rng.uniform(15, 35)),
                       ssim=float(rng.uniform(0.3, 0.95)), identity_distance=float(rng.uniform(0.2, 0.9)))
        rows.append(row)
    if errors:
        for j in range(3):
            uri = f"s3://bucket/raw/crowd{j}.jpg"
            rows.append(dict(source_uri=uri, status="no_face", error=f"{uri}: no face found (0 detections)",
                             run_id="run-a", processed_at=T0))
        for j in range(2):
            uri = f"s3://bucket/raw/broken{j}.png"
            rows.append(dict(source_uri=uri, status="decode_error",
                             error=f"{uri}: cannot identify image file <_io.BytesIO object at 0x7f{j}3ab>",
                             run_id="run-b", processed_at=T0 + _dt.timedelta(hours=24)))
        rows.append(dict(source_uri="s3://bucket/raw/huge.tif", status="too_large",
                         error="s3://bucket/raw/huge.tif: 30000x20000 pixels > 178956970", run_id="run-b",
                         processed_at=T0 + _dt.timedelta(hours=24)))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return commit_table(out, schemas.rows_to_table(rows, N_STYLES), N_STYLES)


def make_edits(tmp_path, output: str, astronaut) -> str:

    from schemas.edits import edit_columns_to_table

    table = schemas.read_outputs(output)
    ok = [r for r in table.select(["image_id", "source_uri", "status"]).to_pylist() if r["status"] == "ok"]
    rng = np.random.default_rng(1)
    cols = {k: [] for k in ("image_id", "source_uri", "direction", "strength", "status", "w_plus", "image",
                            "image_format", "run_id")}
    for r in ok:
        for s in (-3.0, 0.0, 3.0):
            for k, v in (("image_id", r["image_id"]), ("source_uri", r["source_uri"]), ("direction", "age"),
                         ("strength", s), ("status", "ok"), ("w_plus", np.zeros((N_STYLES, 512), np.float32)),
                         ("image", _png(_crop(np.asarray(astronaut), rng))), ("image_format", "png"), ("run_id", "edit-1")):
                cols[k].append(v)
    edits = tmp_path / "edits"
    write_deltalake(str(edits), edit_columns_to_table(cols, N_STYLES))
    return str(edits)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.text, self.links = set(), [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a)
        for key in ("href", "src"):
            if key in a and tag != "img":
                self.links.append(a[key])

    def handle_data(self, data):
        self.text.append(data)


def _parse(path) -> _Page:
    page = _Page()
    with open(path, encoding="utf-8") as f:
        page.feed(f.read())
    page.all_text = " ".join(" ".join(page.text).split())
    return page


def test_report_shows_every_section(tmp_path, astronaut):
    from jobs.cli import main

    output = make_output(tmp_path, astronaut)
    edits = make_edits(tmp_path, output, astronaut)
    html = tmp_path / "report.html"
    assert main(["report", output, "--html", str(html), "--edits", edits, "--sample", "5", "--extremes", "3"]) == 0
    page = _parse(html)
    assert {"status", "runs", "contact-sheet", "extremes", "histograms", "pca", "errors"} <= page.ids
    assert not page.links  # nothing but inline data
    for img in page.imgs:  # every image is inline and decodes
        assert img["src"].startswith("data:image/")
        Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).load()
    alts = [img["alt"] for img in page.imgs]
    text = page.all_text
    # status counts and run history
    assert "ok 10" in text and "no_face 3" in text and "decode_error 2" in text and "too_large 1" in text
    assert "run-a 9 6 3" in text and "run-b 7 4 3" in text
    # contact sheet: input, aligned crop (or why not), reconstruction, mixes, edits
    assert "Contact sheet (5 random ok rows)" in text
    for label in ("input", "aligned crop", "reconstruction", "mix 0", "age -3", "age +0", "age +3"):
        assert label in alts, label
    assert "not stored (--save-aligned)" in text and "not readable" in text  # face3's input is gone
    # worst/best by both metrics, 3 rows each
    assert "by mse" in text and "by identity_distance" in text and "worst 3" in text and "best 3" in text
    # one histogram per number, and the PCA
    for name in ("face_score", "mse", "psnr", "ssim", "identity_distance"):
        assert f"histogram of {name}" in alts
    assert "PCA of W+" in alts
    # errors grouped by message, without the URIs that make each one unique
    assert "no_face no face found (N detections) 3" in text
    assert "decode_error cannot identify image file <_io.BytesIO object at <addr>> 2" in text
    assert "too_large NxN pixels > N 1" in text


def test_report_without_metrics_ok_rows_or_rows(tmp_path, astronaut):
    from pipelines.report import build_report

    output = make_output(tmp_path, astronaut, n_ok=0)  # only failures
    page = build_report(output, read_inputs=False)
    assert "No ok rows to show." in page and "No mse values" in page and "needs at least 2 ok rows" in page
    assert "no_face" in page
    other = tmp_path / "nometrics"
    other.mkdir()
    output = make_output(other, astronaut, n_ok=3, metrics=False, errors=False)
    page = build_report(output, read_inputs=False)
    assert "No identity_distance values" in page and "mse: no values" in page and "No errors." in page
    assert 'alt="PCA of W+"' in page and 'alt="reconstruction"' in page
    empty = commit_table(tmp_path / "empty", schemas.output_schema(N_STYLES).empty_table(), N_STYLES)
    page = build_report(empty)
    assert "The table has no rows." in page and "No runs." in page


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium and chromium-driver: "
                    "apt-get install -y chromium chromium-driver")
def test_report_in_headless_chromium(tmp_path, astronaut):
    pytest.importorskip("selenium", reason="needs selenium (pip)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from pipelines.report import write_report

    output = make_output(tmp_path, astronaut)
    html = write_report(output, str(tmp_path / "report.html"), edits=make_edits(tmp_path, output, astronaut))
    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
        driver.get(f"file://{html}")
        assert driver.title.startswith("psp report")
        state = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
        assert len(state) > 20
        bad = [s for s in state if not (s[1] and s[2] > 0)]
        assert not bad, bad  # every image decoded
        sections = driver.execute_script("return ['status','runs','contact-sheet','extremes','histograms','pca',"
                                         "'errors'].filter(id => !document.getElementById(id));")
        assert sections == []
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe  # no console errors (a blocked load would be one)
        # the whole page, beyond the viewport (DevTools protocol)
        png = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        shot = tmp_path / "report.png"
        shot.write_bytes(base64.b64decode(png["data"]))
        with Image.open(shot) as im:
            assert im.width >= 1000 and im.height > 1000
            assert np.asarray(im.convert("L")).std() > 10  # not a blank page
        if os.environ.get("PSP_REPORT_SCREENSHOT"):
            shutil.copy(shot, os.environ["PSP_REPORT_SCREENSHOT"])
    finally:
        driver.quit()
