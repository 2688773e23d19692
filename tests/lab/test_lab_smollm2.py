"""The lab on the real SmolLM2-135M in a real browser: the page loads and the Rank panel's counts
are parameter_report's on SmolLM2 (and the published 2,442,240 for r=8 on every projection)."""

from __future__ import annotations

import os

import pytest

import splice
from splice.core.report import parameter_report
from splice.lab.app import create_app
from splice.lab.serve import BackgroundServer

from lab_helpers import CHROMIUM, launch_chromium

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is absent (`make test` installs Debian's chromium)"),
]


def test_lab_on_smollm2_shows_parameter_report_counts(smollm2, tmp_path, artifacts):
    sync_api = pytest.importorskip("playwright.sync_api")
    model, tokenizer = smollm2  # the lab counts on a meta-device skeleton: the model is untouched
    app = create_app(model, tokenizer, model_name="smollm2-135m")
    with BackgroundServer(app) as url, sync_api.sync_playwright() as playwright:
        context = launch_chromium(playwright, tmp_path / "profile")
        page = context.new_page()
        page.set_default_timeout(120_000)
        page.goto(url + "/#rank")
        page.wait_for_selector("body[data-rank-ready='8:q_proj,v_proj']")
        report = parameter_report(model, splice.LoRAConfig(rank=8, target_modules=("q_proj", "v_proj")))
        assert float(page.get_attribute("#rank-adapter-params", "data-value")) == report.adapter_params
        assert report.adapter_params == 30 * 8 * ((576 + 576) + (576 + 192))
        assert page.text_content("#rank-model-params") == f"{134_515_008:,}"
        page.check("#targets-all")
        page.wait_for_selector("body[data-rank-ready='8:all-linear']")
        assert page.text_content("#rank-adapter-params") == "2,442,240"
        page.screenshot(path=artifacts / "smollm2-rank.png", full_page=True)
        context.close()
