"""The lab page in a real browser (Debian's Chromium through Playwright), panel by panel, on a
tiny random Llama served by uvicorn on a free loopback port. Numbers read off the page are
checked against the library's functions; each panel leaves a PNG screenshot in the artefacts
folder."""

from __future__ import annotations

import dataclasses
import os

import pytest

import splice
from splice.core.report import parameter_report
from splice.lab.app import create_app
from splice.lab.serve import BackgroundServer
from splice.plan import plan_all_methods, shape_from_model, shape_from_preset

from lab_helpers import CHROMIUM, TRAIN, launch_chromium, reference_answer, tiny_base

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is absent (`make test` installs Debian's chromium)"),
]

TIMEOUT_MS = 120_000  # generous: the 2-core test machines are often busy
# Long enough that pause and stop land mid-run even on a fast machine (~0.1 s a step).
TRAIN_LONGER = dataclasses.replace(TRAIN, steps=20)


@pytest.fixture(scope="module")
def page(tmp_path_factory, tokenizer, library_dir):
    """One page on one server for the module: the tests walk the panels in order."""
    sync_api = pytest.importorskip("playwright.sync_api")
    app = create_app(tiny_base(len(tokenizer)), tokenizer, library_dir, model_name="tiny-llama",
                     train_settings=TRAIN_LONGER)
    with BackgroundServer(app) as url, sync_api.sync_playwright() as playwright:
        context = launch_chromium(playwright, tmp_path_factory.mktemp("chromium-profile"))
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/#rank")
        page.wait_for_selector("body[data-ready='1']")
        yield page
        context.close()


def value(page, selector: str) -> float:
    return float(page.get_attribute(selector, "data-value"))


def show(page, panel: str) -> None:
    page.click(f"button.tab[data-panel={panel}]")
    page.wait_for_selector(f"#panel-{panel}.active")


def test_rank_slider_shows_parameter_report_counts(page, tokenizer, artifacts):
    show(page, "rank")
    model = tiny_base(len(tokenizer))
    for rank in (64, 1, 256):
        page.fill("#rank-slider", str(rank))
        page.wait_for_selector(f"body[data-rank-ready='{rank}:q_proj,v_proj']")
        report = parameter_report(model, splice.LoRAConfig(rank=rank, target_modules=("q_proj", "v_proj")))
        assert value(page, "#rank-adapter-params") == report.adapter_params
        assert page.text_content("#rank-adapter-params") == f"{report.adapter_params:,}"
        assert value(page, "#rank-model-params") == report.model_params
        assert page.text_content("#rank-example-lora") == f"{rank * 8192:,}"
        assert page.text_content("#rank-example-full") == "16,777,216"
    page.fill("#rank-slider", "8")
    page.check("#targets-all")
    page.wait_for_selector("body[data-rank-ready='8:all-linear']")
    report = parameter_report(model, splice.LoRAConfig(rank=8, target_modules="all-linear"))
    assert value(page, "#rank-adapter-params") == report.adapter_params
    assert page.text_content("#rank-example-lora") == "65,536"
    page.screenshot(path=artifacts / "rank.png", full_page=True)


def test_memory_bars_show_the_planners_numbers(page, tokenizer, artifacts):
    show(page, "memory")
    page.wait_for_selector("body[data-memory-ready]")
    cases = [("loaded", {"rank": 8, "batch": 1, "seq": 512}, shape_from_model(tiny_base(len(tokenizer)))),
             ("7B", {"rank": 16, "batch": 2, "seq": 1024}, shape_from_preset("7B", "llama"))]
    for model, settings, shape in cases:
        page.select_option("#mem-model", model)
        for name, number in settings.items():
            page.fill(f"#mem-{name}", str(number))
        page.wait_for_selector(f"body[data-memory-ready^='model={model}&rank={settings['rank']}&batch="
                               f"{settings['batch']}&seq={settings['seq']}&']")
        for plan in plan_all_methods(shape, **settings):
            method = plan.settings.method
            row = f"#mem-table tr[data-method={method}]"
            assert value(page, f"{row} td[data-part=weights]") == plan.frozen_weights + plan.trainable_weights
            assert value(page, f"{row} td[data-part=gradients]") == plan.gradients
            assert value(page, f"{row} td[data-part=optimizer]") == plan.optimizer_state
            assert value(page, f"{row} td[data-part=activations]") == plan.activations
            assert value(page, f"{row} td.peak") == plan.total
            segment = f"#mem-chart rect[data-group={method}][data-part=activations]"
            assert value(page, segment) == plan.activations
            assert value(page, f"#mem-chart line.peak[data-group={method}]") == plan.total
    page.screenshot(path=artifacts / "memory.png", full_page=True)


def wait_train(page, state: str) -> None:
    page.wait_for_selector(f"body[data-train-state='{state}'], body[data-train-state='failed']")
    assert page.get_attribute("body", "data-train-state") == state, page.text_content("#train-error")


def wait_events(page, count: int) -> None:
    page.wait_for_function(f"window.lab.train.events.length >= {count}")


def test_train_play_moves_delta_w_off_zero_and_the_loss_falls(page, artifacts):
    show(page, "train")
    page.click("#train-play")
    wait_events(page, 3)
    page.click("#train-pause")
    wait_train(page, "paused")
    page.wait_for_timeout(300)  # the step in flight lands
    held = page.evaluate("window.lab.train.events.length")
    page.wait_for_timeout(500)
    assert page.evaluate("window.lab.train.events.length") == held < TRAIN_LONGER.steps + 1
    page.click("#train-play")
    wait_train(page, "done")
    events = page.evaluate("window.lab.train.events")
    assert [e["step"] for e in events] == list(range(TRAIN_LONGER.steps + 1))
    assert set(events[0]["norms"].values()) == {0.0}
    assert min(events[-1]["norms"].values()) > 0
    assert value(page, "#train-loss") == events[-1]["loss"] < value(page, "#train-loss-first") == events[0]["loss"]
    assert page.get_attribute("#loss-chart polyline", "data-count") == str(TRAIN_LONGER.steps + 1)
    assert page.locator("#norm-chart rect.column").count() == len(events[-1]["norms"])
    assert value(page, "#train-norm-max") == max(events[-1]["norms"].values())
    page.screenshot(path=artifacts / "train.png", full_page=True)


def test_train_stop_ends_a_run_early(page):
    show(page, "train")
    page.click("#train-play")  # a new run: the chart starts again from step 0
    wait_events(page, 2)
    page.click("#train-stop")
    wait_train(page, "stopped")
    events = page.evaluate("window.lab.train.events")
    assert events[0]["step"] == 0 and set(events[0]["norms"].values()) == {0.0}
    assert len(events) < TRAIN_LONGER.steps + 1


def wait_answer(page, label: str) -> dict:
    page.wait_for_selector(f"body[data-answer-for='{label}']:not([data-library-busy])")
    return page.evaluate("window.lab.answer")


def test_library_merge_changes_the_answer_and_unmerge_restores_it(page, tokenizer, library_dir, artifacts):
    show(page, "library")
    page.wait_for_selector("#lib-list button.merge[data-name=formal]")
    page.click("#lib-ask")
    base = wait_answer(page, "nothing")
    assert base["base"] == base["current"] == reference_answer(tokenizer, library_dir, {})

    page.click("#lib-list button.merge[data-name=formal]")
    merged = wait_answer(page, "formal")
    assert page.text_content("#lib-answer-current") == merged["current"]
    assert merged["current"] != merged["base"] == base["base"]
    assert merged["current"] == reference_answer(tokenizer, library_dir, {"formal": 1.0})
    assert page.text_content("#lib-applied") == "formal"
    page.screenshot(path=artifacts / "library-merged.png", full_page=True)

    page.click("#lib-unmerge")
    restored = wait_answer(page, "nothing")
    assert restored["current"] == restored["base"] == base["base"]
    assert page.text_content("#lib-answer-current") == base["base"]


def test_library_blend_answers_with_the_weighted_sum(page, tokenizer, library_dir, artifacts):
    show(page, "library")
    page.select_option("#blend-a", "formal")
    page.select_option("#blend-b", "terse")
    page.fill("#blend-wa", "0.8")
    page.fill("#blend-wb", "-0.4")
    page.click("#blend-apply")
    answer = wait_answer(page, "blend 0.8·formal + -0.4·terse")
    assert answer["applied"] == {"kind": "blend", "names": ["formal", "terse"], "weights": [0.8, -0.4]}
    assert answer["current"] == reference_answer(tokenizer, library_dir, {"formal": 0.8, "terse": -0.4})
    assert answer["current"] != answer["base"]
    page.screenshot(path=artifacts / "library-blend.png", full_page=True)
    page.click("#lib-unmerge")
    wait_answer(page, "nothing")


def test_family_table_is_the_method_table(page, artifacts):
    show(page, "family")
    rows = page.locator("#family-table tbody tr")
    table = splice.method_table()
    assert rows.count() == len(table)
    for i, row in enumerate(table):
        cells = rows.nth(i).locator("td").all_text_contents()
        assert cells == [row["method"], row["trains"], row["mergeable"], row["file format"]]
    page.screenshot(path=artifacts / "family.png", full_page=True)
