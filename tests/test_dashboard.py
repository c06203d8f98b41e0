"""The dashboard in a real browser: Debian's Chromium, driven through chromedriver, against a
server loaded through the wire with API keys required. Without a key the page asks for one
and the API refuses; with a read key every part loads, the charts draw, the console stays
clean, and a click drills down to one run's steps. A screenshot is left in the test's
directory. Needs Debian's chromium and chromium-driver (.ci/run installs them): skipped
without them, failed under CI=true."""

from __future__ import annotations

import datetime
import json
import random
import re
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid

import grpc
import pytest

from tally.v1 import (
    common_pb2,
    experience_type_service_pb2 as et_pb,
    experience_type_service_pb2_grpc as et_grpc,
    ingest_service_pb2 as pb,
    ingest_service_pb2_grpc as ing_grpc,
    limit_service_pb2 as lim_pb,
    limit_service_pb2_grpc as lim_grpc,
    report_service_pb2 as rep_pb,
    report_service_pb2_grpc as rep_grpc,
)
from tally_client.output import format_nanos

from .conftest import IN_CI
from .readme import BIN
from .server_process import ServerProcess
from .test_readme import free_port

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        reason = "the dashboard test needs Debian's chromium and chromium-driver"
        if IN_CI:
            pytest.fail(f"CI=true: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1100",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def keys(url: str, name: str, scope: str) -> str:
    command = [str(BIN / "tally"), "keys", "create", "--name", name, "--scope", scope, "--create"]
    created = subprocess.run([*command, "--database-url", url], capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


def seed(target: str, admin: str) -> None:
    """Two types, runs of two models and an unpriced event, through the wire."""
    metadata = (("authorization", f"Bearer {admin}"),)
    with grpc.insecure_channel(target) as channel:
        types = et_grpc.ExperienceTypeServiceStub(channel)
        ingest = ing_grpc.IngestServiceStub(channel)
        # The README's limits, before the events they count: one per experience of a type (the
        # panel once broke on it; it shows its busiest runs), one per tag.
        limits = lim_grpc.LimitServiceStub(channel)
        one_dollar = common_pb2.Money(currency_code="USD", units=1)
        for limit_name, scope in (  # every scope
            ("per-summary", lim_pb.LimitScope(experience_type="Document_Summarization", per_experience=True)),
            ("eng-daily", lim_pb.LimitScope(request_tag="team-eng")),
            ("house", lim_pb.LimitScope(everything=True)),
            ("chatbot", lim_pb.LimitScope(experience_type="Chatbot")),
            ("summary-v2", lim_pb.LimitScope(experience_type="Document_Summarization", experience_version=2)),
            ("one-run", lim_pb.LimitScope(experience_id=str(ONE_RUN))),
            ("ann", lim_pb.LimitScope(user_id="ann")),
        ):
            limit = lim_pb.Limit(name=limit_name, max=one_dollar, kind=1, period=2, scope=scope)
            limits.CreateLimit(lim_pb.CreateLimitRequest(limit=limit), metadata=metadata)
        for name in ("Document_Summarization", "Chatbot"):
            new = et_pb.ExperienceType(name=name, description=name)
            types.CreateExperienceType(et_pb.CreateExperienceTypeRequest(experience_type=new), metadata=metadata)
            for run in range(3):
                events = [
                    pb.UsageEvent(
                        category="system.openai",
                        resource=model,
                        units={"text": pb.UnitCounts(input=20_000 * (run + 1), output=2_000)},
                    )
                    for model in ("gpt-4o", "gpt-4o-mini")
                ]
                first = name == "Document_Summarization" and not run
                run_metadata = (
                    *metadata,
                    ("xproxy-experience-name", name),
                    ("xproxy-experience-id", str(ONE_RUN if first else uuid.uuid4())),
                    *((("xproxy-request-tags", "team-eng"),) if name == "Chatbot" and run else ()),
                    *((("xproxy-user-id", "ann"),) if first else ()),
                )
                ingest.IngestBatch(pb.IngestBatchRequest(events=events), metadata=run_metadata)
        # A second version of one type, its runs dearer: the page compares the two.
        types.IncrementExperienceTypeVersion(
            et_pb.IncrementExperienceTypeVersionRequest(name="Document_Summarization"), metadata=metadata
        )
        dearer = pb.UsageEvent(category="system.openai", resource="gpt-4o", units={"text": pb.UnitCounts(input=90_000)})
        for _ in range(2):
            run_metadata = (
                *metadata,
                ("xproxy-experience-name", "Document_Summarization"),
                ("xproxy-experience-id", str(uuid.uuid4())),
            )
            ingest.Ingest(pb.IngestRequest(event=dearer), metadata=run_metadata)
        misspelt = pb.UsageEvent(category="system.openai", resource="gtp-4o", units={"text": pb.UnitCounts(input=5)})
        ingest.Ingest(pb.IngestRequest(event=misspelt), metadata=metadata)
        # Names a caller chose, shown as text wherever they appear (models, reasons, steps).
        for hostile in HOSTILE:  # as a model, a user, a tag and a property value
            event = pb.UsageEvent(
                category="system.openai",
                resource=hostile,
                units={"text": pb.UnitCounts(input=5)},
                properties={"note": hostile},
                context=pb.EventContext(experience_name="Chatbot", user_id=hostile, request_tags=[hostile]),
            )
            ingest.Ingest(pb.IngestRequest(event=event), metadata=metadata)


def tile(browser, label: str) -> str:
    """The figure of the summary tile named `label`."""
    from selenium.webdriver.common.by import By

    for each in browser.find_elements(By.CSS_SELECTOR, "#tiles .tile"):
        name, figure, _ = each.find_elements(By.TAG_NAME, "div")
        if name.text == label:
            return figure.text
    raise AssertionError(f"no tile {label!r}")


def _breakdown(target: str, admin: str, window: tuple, **only: str) -> rep_pb.BreakDownCostResponse:
    request = rep_pb.BreakDownCostRequest(group_by=[rep_pb.COST_DIMENSION_CATEGORY], **only)
    request.start_time.FromDatetime(window[0])
    request.end_time.FromDatetime(window[1])
    with grpc.insecure_channel(target) as channel:
        reports = rep_grpc.ReportServiceStub(channel)
        return reports.BreakDownCost(request, metadata=(("authorization", f"Bearer {admin}"),))


def total_nanos(target: str, admin: str, window: tuple, **only: str) -> int:
    total = _breakdown(target, admin, window, **only).total.cost_total
    return total.units * 1_000_000_000 + total.nanos


ONE_RUN = uuid.UUID("0190b5a8-0000-7000-8000-0000000000aa")  # the limit "one-run"'s experience


def total_events(target: str, admin: str, window: tuple, **only: str) -> int:
    return _breakdown(target, admin, window, **only).total.event_count


# Each would run script if the page put it in as HTML or a link.
HOSTILE = (
    '<img src=x onerror="window.__pwned=1">',
    "<script>window.__pwned=2</script>",
    "javascript:window.__pwned=3",
)


@pytest.mark.slow
def test_the_dashboard_needs_a_key_then_draws_spend_runs_versions_and_reasons(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url = f"sqlite+aiosqlite:///{tmp_path / 'dashboard.db'}"
    admin, reader = keys(url, "admin", "admin"), keys(url, "reader", "read")
    web = free_port()
    # Beyond loopback (keys required): any Host is answered, behind the key.
    server = ServerProcess(url, "--auth", "required", "--web-listen", f"0.0.0.0:{web}").start()
    try:
        assert f"dashboard at http://0.0.0.0:{web}/ (every interface)" in "".join(server.lines)
        seed(server.target, admin)
        page = f"http://127.0.0.1:{web}/"
        with pytest.raises(urllib.error.HTTPError) as refused:  # the API refuses without a key
            urllib.request.urlopen(f"{page}api/spend", timeout=10)
        assert refused.value.code == 401

        browser.get(page)
        wait = WebDriverWait(browser, 20)
        wait.until(shown.visibility_of_element_located((By.ID, "key-form")))
        assert browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr") == [], "nothing shown without a key"
        browser.find_element(By.ID, "secret").send_keys(reader)
        browser.find_element(By.CSS_SELECTOR, "#key button").click()
        wait.until(lambda driver: driver.execute_script("return document.body.dataset.loaded") == "true")

        charts = browser.execute_script(
            "return ['spend-chart', 'versions-chart'].map((id) => {"
            " const chart = Chart.getChart(id);"
            " return chart ? chart.data.datasets.reduce((n, d) => n + d.data.filter((v) => v > 0).length, 0) : -1; })"
        )
        assert all(points > 0 for points in charts), charts
        runs = browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
        assert len(runs) == 11, [r.text for r in runs]  # 8 runs, and one per hostile event
        ids = [r.find_element(By.CSS_SELECTOR, "td.id").text for r in runs]
        assert len(set(ids)) == 11 and all(uuid.UUID(i) for i in ids), "each run told apart by its id"
        two = next(r for r, cells in ((r, r.find_elements(By.TAG_NAME, "td")) for r in runs) if cells[5].text == "2")
        two.click()  # a run of two events
        wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "#steps tbody tr")) == 2)
        assert "chosen" in two.get_attribute("class"), "the chosen run is highlighted"
        assert browser.find_element(By.ID, "run-id").text == two.find_element(By.CSS_SELECTOR, "td.id").text
        steps = browser.find_element(By.ID, "steps").text
        assert "not reported" in steps and re.search(r"text [\d,]+ in / 2,000 out", steps), steps
        unpriced = browser.find_element(By.ID, "unpriced").text
        assert "did you mean gpt-4o?" in unpriced, unpriced
        for hostile in HOSTILE:  # shown as the text it is
            assert hostile in unpriced, unpriced
        limits = browser.find_element(By.ID, "limits").text
        assert "per-summary" in limits and "per experience" in limits and "eng-daily" in limits, limits
        versions = browser.find_element(By.ID, "versions").text
        assert "Chatbot" in versions and "Document_Summarization" in versions
        compared = browser.find_elements(By.CSS_SELECTOR, "#compare tbody tr")
        assert [row.text.split()[:4] for row in compared] == [["Document_Summarization", "v1", "\u2192", "v2"]]
        assert "3 / 2" in compared[0].text and "not enough runs" in compared[0].text, compared[0].text

        browser.save_screenshot(str(tmp_path / "overview.png"))
        # One money rule: the page's usd() writes what the CLI's tables write, for the same amount.
        rng = random.Random(28)
        amounts = [0, 1, 480, 999_950_000, 999_949_999, 422_850_000, 57_500_000, 10**9, 1_234_567_890_123, -57_500_000]
        amounts += [rng.randint(1, 10 ** rng.randint(1, 14)) for _ in range(300)]
        exact = [f"{'-' if n < 0 else ''}{abs(n) // 10**9}.{abs(n) % 10**9:09d}" for n in amounts]
        assert browser.execute_script("return arguments[0].map(usd)", exact) == [format_nanos(n) for n in amounts]
        # The tiles are the gRPC reports' figures for the same window, in the one money format.
        today = datetime.datetime.now(datetime.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        window = (today - datetime.timedelta(days=29), today + datetime.timedelta(days=1))
        assert tile(browser, "Spend") == format_nanos(total_nanos(server.target, admin, window))
        assert tile(browser, "Events") == f"{total_events(server.target, admin, window):,}"
        whole = _breakdown(server.target, admin, window).total
        assert whole.input_tokens > 0 and tile(browser, "Tokens in") == f"{whole.input_tokens:,}"
        assert tile(browser, "Tokens out") == f"{whole.output_tokens:,}"

        # A reason opens the request log kept to its events.
        reason = next(
            r for r in browser.find_elements(By.CSS_SELECTOR, "#unpriced tbody tr") if "did you mean" in r.text
        )
        reason.click()
        wait.until(lambda driver: "not priced: " in driver.find_element(By.ID, "log-about").text)
        logged = browser.find_elements(By.CSS_SELECTOR, "#log tbody tr")
        assert len(logged) == 1 and "gtp-4o" in logged[0].text, [r.text for r in logged]

        # Spend by tag: BreakDownCost's groups; a tag opens the view of its events.
        Select(browser.find_element(By.ID, "spend-by")).select_by_value("tag")
        wait.until(lambda driver: driver.find_element(By.ID, "spend-by-name").text == "Tag")
        by_tag = {
            r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[3].text
            for r in browser.find_elements(By.CSS_SELECTOR, "#spend-by-table tbody tr")
        }
        assert by_tag == {
            **dict.fromkeys(HOSTILE, "$0.00"),  # unpriced: $0, shown as the text it is
            "team-eng": format_nanos(total_nanos(server.target, admin, window, request_tag="team-eng")),
            "(no tag)": format_nanos(
                total_nanos(server.target, admin, window)
                - total_nanos(server.target, admin, window, request_tag="team-eng")
            ),
        }, by_tag
        Select(browser.find_element(By.ID, "spend-by")).select_by_value("user")
        wait.until(lambda driver: driver.find_element(By.ID, "spend-by-name").text == "User")
        by_user = browser.find_element(By.ID, "spend-by-table").text
        for hostile in HOSTILE:
            assert hostile in by_user, by_user
            # The request log finds it by its property, and shows the value as text.
            search = browser.find_element(By.ID, "search")
            search.clear()
            search.send_keys(f"note={hostile}")
            browser.find_element(By.CSS_SELECTOR, "#log-form button[type=submit]").click()
            wait.until(lambda driver, h=hostile: f"found by note={h}" in driver.find_element(By.ID, "log-about").text)
            logged = browser.find_elements(By.CSS_SELECTOR, "#log tbody tr")
            assert len(logged) == 1 and f"note={hostile}" in logged[0].text, [r.text for r in logged]

        # The limits: each with its period; the per-experience limit's busiest runs are
        # ListLimitPeriods' (spend desc), and one opens its run.
        with grpc.insecure_channel(server.target) as channel:
            asked = lim_pb.ListLimitPeriodsRequest(name="per-summary", order_by="spend desc", page_size=3)
            busiest = lim_grpc.LimitServiceStub(channel).ListLimitPeriods(
                asked, metadata=(("authorization", f"Bearer {admin}"),)
            )
        runs_shown = browser.find_elements(By.CSS_SELECTOR, "#busiest tbody tr")
        assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in runs_shown] == [
            p.experience_id for p in busiest.periods
        ] and len(runs_shown) == 3
        assert [r.find_elements(By.TAG_NAME, "td")[2].text for r in runs_shown] == [
            format_nanos(p.spend.units * 10**9 + p.spend.nanos) for p in busiest.periods
        ]
        runs_shown[0].click()
        wait.until(lambda driver: driver.find_element(By.ID, "run-id").text == busiest.periods[0].experience_id)
        midnight = today.strftime("%Y-%m-%d 00:00:00")
        limit_rows = browser.find_elements(By.CSS_SELECTOR, "#limits tbody tr")
        with grpc.insecure_channel(server.target) as channel:
            limits_api = lim_grpc.LimitServiceStub(channel)
            auth = (("authorization", f"Bearer {admin}"),)
            for row in limit_rows:  # each limit's spend this period is GetLimit's
                cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
                got = limits_api.GetLimit(lim_pb.GetLimitRequest(name=cells[0]), metadata=auth)
                if cells[0] == "per-summary":
                    assert cells[3] == "-" and cells[6] == "per experience", cells
                    continue
                spent = got.current.spend.units * 10**9 + got.current.spend.nanos
                assert cells[3] == format_nanos(spent), (cells, got.current)
                assert spent > 0 or cells[0] == "summary-v2", cells
        assert all(f"day: {midnight} to " in r.text for r in limit_rows), [r.text for r in limit_rows]
        # A limit opens the log of its events this period: its scope and period become the view.
        next(r for r in limit_rows if r.text.startswith("eng-daily")).click()
        wait.until(lambda driver: "tag=team-eng" in driver.current_url)
        wait.until(lambda driver: driver.execute_script("return document.body.dataset.loaded") == "true")
        this_day = (today, today + datetime.timedelta(days=1))
        assert tile(browser, "Spend") == format_nanos(
            total_nanos(server.target, admin, this_day, request_tag="team-eng")
        )
        tagged = browser.find_elements(By.CSS_SELECTOR, "#log tbody tr")
        assert len(tagged) == total_events(server.target, admin, this_day, request_tag="team-eng") == 4
        # Spend by tag, kept to a tag: that tag alone, and the page says why.
        Select(browser.find_element(By.ID, "spend-by")).select_by_value("tag")
        wait.until(lambda driver: "not broken down" in driver.find_element(By.ID, "spend-by-about").text)
        shown_tags = [
            [cell.text for cell in r.find_elements(By.TAG_NAME, "td")]
            for r in browser.find_elements(By.CSS_SELECTOR, "#spend-by-table tbody tr")
        ]
        eng_today = format_nanos(total_nanos(server.target, admin, this_day, request_tag="team-eng"))
        assert [(r[0], r[3]) for r in shown_tags] == [("team-eng", eng_today)], shown_tags
        browser.get(page)
        wait.until(lambda driver: driver.execute_script("return document.body.dataset.loaded") == "true")

        # A filter changes every panel, lives in the URL, and survives a reload.
        browser.find_element(By.ID, "f-type").send_keys("Chatbot")
        browser.find_element(By.ID, "apply").click()
        wait.until(lambda driver: "type=Chatbot" in driver.current_url)
        wait.until(lambda driver: driver.execute_script("return document.body.dataset.loaded") == "true")
        chatbot = total_nanos(server.target, admin, window, experience_name="Chatbot")
        assert tile(browser, "Spend") == format_nanos(chatbot)
        assert {
            r.find_elements(By.TAG_NAME, "td")[1].text.split()[0]
            for r in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")
        } == {"Chatbot"}
        assert "Document_Summarization" not in browser.find_element(By.ID, "versions").text
        browser.refresh()
        wait.until(lambda driver: driver.execute_script("return document.body.dataset.loaded") == "true")
        assert browser.find_element(By.ID, "f-type").get_attribute("value") == "Chatbot"
        assert tile(browser, "Spend") == format_nanos(chatbot)
        browser.save_screenshot(str(tmp_path / "filtered.png"))
        # A custom range before any event: nothing in it, and it says so.
        browser.get(page + "?from=2020-01-01&to=2020-01-31")
        wait.until(lambda driver: driver.execute_script("return document.body.dataset.loaded") == "true")
        assert tile(browser, "Spend") == "$0.00" and tile(browser, "Events") == "0"
        assert browser.find_elements(By.CSS_SELECTOR, "#log tbody tr") == []
        assert browser.execute_script("return window.__pwned") is None, "a name ran as script"
        assert (
            browser.execute_script(
                "return document.querySelectorAll('img[src=x], a[href^=javascript], script:not([src])').length"
            )
            == 0
        )

        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        print(f"\nscreenshot: {tmp_path / 'dashboard.png'}")
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, json.dumps(errors, indent=2)
    finally:
        server.terminate()
