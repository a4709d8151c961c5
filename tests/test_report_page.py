"""The report page eval_<split>.html (report.py + web/eval_report.html): self-contained, and in a real
headless browser it loads without console errors, sorts, filters and shows every picture."""
from __future__ import annotations

import json
import re

import pytest

import data_utils
import helpers_infer as hi
import report
import test_eval
from config import DecodeConfig
from helpers_browser import console_errors, open_browser
from helpers_infer import one_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """An evaluation of the tiny model's test split compared with a weaker checkpoint: (summary, page)."""
    base = tmp_path_factory.getbasetemp()
    root = hi.make_kaggle_set(tmp_path_factory.mktemp("report_set"))
    out = tmp_path_factory.mktemp("report")
    cfg = data_utils.DataConfig(dataset_path=str(root), split_sizes=(4, 2), min_word_freq=1, num_workers=0)
    summary = test_eval.run_evaluation(hi.tiny_checkpoint(base), cfg, DecodeConfig(beam_size=2), results_dir=out,
                                       graphs_dir=out / "graphs", use_java=False, device="cpu", grid_images=2,
                                       resamples=200, compare=hi.weak_checkpoint(base))
    return summary, out / "eval_test.html"


def _embedded(page) -> dict:
    html = page.read_text(encoding="utf-8")
    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S).group(1))


def test_the_page_loads_nothing_from_elsewhere(evaluated):
    summary, page = evaluated
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|<link|@import|url\(\s*["']?http""", html, re.I)
    data = _embedded(page)
    assert set(data["thumbnails"]) == set(summary["per_image"])  # every image, embedded
    assert all(v.startswith("data:image/jpeg;base64,") for v in data["thumbnails"].values())
    assert len(data["attention"]) == 2 and data["histograms"].startswith("data:image/png;base64,")
    assert data["settings"]["items"]["decoding"].startswith("beam_size 2")


def test_text_cannot_end_the_embedded_script():
    data = {"caption": "</script><script>alert(1)</script> & <b>"}
    html = report.render(data)
    assert "</script><script>alert" not in html
    embedded = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S).group(1)
    assert json.loads(embedded) == data


def _column(driver, table: str, index: int) -> list[str]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f"#{table} tr")[1:]
    return [r.find_elements(By.TAG_NAME, "td")[index].text for r in rows if r.is_displayed()]


def test_in_a_browser_the_page_shows_sorts_and_filters(evaluated, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    summary, page = evaluated
    driver = open_browser(tmp_path / "profile", 1300, 1600)
    try:
        driver.get(page.as_uri())
        assert console_errors(driver) == []
        assert "Evaluation of tiny/best.pt on the test split" in driver.find_element(By.ID, "title").text
        metrics_text = driver.find_element(By.ID, "metrics").text
        assert "B better in" in metrics_text and "% of resamples" in metrics_text
        assert "copied from training" in driver.find_element(By.ID, "diagnostics").text
        pictures = driver.find_elements(By.CSS_SELECTOR, "img.thumb, #attention img, #histograms")
        assert len(pictures) == 2 * summary["num_images"] + 2 + 1  # both tables' thumbnails, 2 maps, histograms
        for img in pictures:  # thumbnails load lazily: scrolled into view first
            driver.execute_script("arguments[0].scrollIntoView()", img)
            WebDriverWait(driver, 10).until(lambda d: d.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth > 0", img))
        headers = driver.find_elements(By.CSS_SELECTOR, "#images th")
        cider = [h.text for h in headers].index("CIDEr-D")
        assert len(_column(driver, "images", cider)) == summary["num_images"]
        headers[cider].click()  # first click: highest first
        values = [float(v) for v in _column(driver, "images", cider)]
        assert values == sorted(values, reverse=True) and headers[cider].get_attribute("aria-sort") == "descending"
        headers[cider].click()
        values = [float(v) for v in _column(driver, "images", cider)]
        assert values == sorted(values) and headers[cider].get_attribute("aria-sort") == "ascending"
        # The compare table starts with the images where A and B disagree most.
        gaps = [float(v) for v in _column(driver, "compare", -1)]
        assert len(gaps) == summary["num_images"] and gaps == sorted(gaps, reverse=True)
        # Filtering by a word keeps the images whose captions or references hold it.
        word = "red"
        expected = [k for k, v in summary["per_image"].items()
                    if word in _words(v["caption"], summary["compare"]["per_image"][k]["caption"],
                                      *_references(summary, k))]
        box = driver.find_element(By.ID, "filter")
        box.send_keys(word)
        assert sorted(_column(driver, "images", 1)) == sorted(expected)
        assert driver.find_element(By.ID, "count").text == f"{len(expected)} of {summary['num_images']} images"
        box.clear()
        box.send_keys("zebra")
        assert _column(driver, "images", 1) == [] and _column(driver, "compare", 0) == []
        assert console_errors(driver) == []
    finally:
        driver.quit()


def _words(*texts: str) -> list[str]:
    """Words as the page's filter sees them: lowercased, split at anything but letters and digits."""
    return re.split(r"[^a-z0-9<>']+", " ".join(texts).lower())


def _references(summary: dict, name: str) -> list[str]:
    data_root = summary["data"]["root"]
    cfg = data_utils.DataConfig(dataset_path=data_root, split_sizes=(4, 2), min_word_freq=1, num_workers=0)
    return next(r.captions for r in data_utils.load_dataset(cfg).test if r.name == name)
