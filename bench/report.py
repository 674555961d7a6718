"""The benchmark's goals, verdicts and printed tables: pure functions of the report dict that
bench/run.py builds (no Django, no torch), so that they are unit-tested on their own.

Shapes read here (all from one run):
  section["raw"][str(batch)], section["engine"][str(batch)]: {"images_per_s", "cpu_ms_per_image", "noisy", ...}
      raw: the in-process eager fp32 NCHW pipeline (torchvision transforms); engine: the platform's Handler
  section["raw_single"]: {"p50_ms", "p99_ms", "noisy"}  the raw pipeline, one image at a time
  section["full"]["c1" | "c8" | "c32"]: a closed-loop phase (images_per_s, p50_ms, p99_ms, median_batch,
      mean_batch_per_image, cpu_ms_per_image {"web", "worker", "client", "redis", "total"}, noise)
  section["during_bulk"]["c1" | "c8"]: the same while a bulk backlog is worked off
  section["linear"]: {"path", "runs": [{"images", "images_per_s", "ms_per_image", "core_ms_per_image", ...}]}
  section["queries"]: {"upload", "batch_1", "batch_8"}
"""

from __future__ import annotations

import statistics

QUIET_CORES = 0.3  # other processes using less than this many cores: a quiet phase
CORES = 2  # the budget arithmetic's machine: the two shared cores

GOALS = {
    "full_ratio_min": {"resnet50": 1.3, "resnet18": 1.1},  # at concurrency 8 and 32
    "full_ratio_concurrencies": ("c8", "c32"),
    "bulk_ratio_min": {"resnet50": 1.3, "resnet18": 1.3},
    "c1_p50_over_raw_ms": 15.0,
    "during_bulk_p99_factor": 1.5,
    "web_core_ms_per_upload": 12.0,  # absolute: CPU time is robust to a noisy machine
    "worker_core_ms_beyond_engine": 8.0,  # absolute, likewise
    "cpu_phase": "c8",  # the full-path phase the two CPU figures are read from
    "linear_tolerance": 0.15,  # per-image cost at the largest N at most this much above the smallest
    "budget_ratios": (1.1, 1.3),
}


# ---------------------------------------------------------------------------------------------------
# Small pure helpers


def is_noisy(result: dict | None) -> bool:
    """A phase during which other processes used the CPUs (or a rate with too few quiet trials)."""
    if not result:
        return False
    if result.get("noisy"):
        return True
    return (result.get("noise", {}).get("others_cores") or 0.0) >= QUIET_CORES


def worker_batch(phase: dict) -> int | None:
    """The batch size the worker actually ran for a phase's images: the per-image median, as an int."""
    median = phase.get("median_batch")
    return int(median) if median else None


def batch_median(sizes: list[int]) -> int | None:
    """Median batch size per image (each image counts once, so big batches weigh as they should)."""
    sizes = [s for s in sizes if s]
    return int(round(statistics.median(sizes))) if sizes else None


def rate_at(rates: dict, batch: int | None) -> dict | None:
    """The measured rate at ``batch`` (keys are str(batch)); the nearest measured one if missing."""
    if batch is None or not rates:
        return None
    if str(batch) in rates:
        return rates[str(batch)]
    nearest = min(rates, key=lambda key: (abs(int(key) - batch), int(key)))
    return rates[nearest]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def full_ratio(section: dict, phase_name: str) -> tuple[float | None, int | None, dict | None]:
    """(full path / raw at the worker's batch size, that batch size, the raw rate used)."""
    phase = section.get("full", {}).get(phase_name) or {}
    batch = worker_batch(phase)
    raw = rate_at(section.get("raw", {}), batch)
    return ratio(phase.get("images_per_s"), raw and raw.get("images_per_s")), batch, raw


def cpu_figures(section: dict, phase_name: str) -> dict:
    """Core-ms per image of the web process and the workers over a full-path phase, and the workers'
    cost beyond the in-process engine's decode + preprocess + forward at the same batch size."""
    phase = section.get("full", {}).get(phase_name) or {}
    cpu = phase.get("cpu_ms_per_image") or {}
    engine = rate_at(section.get("engine", {}), worker_batch(phase))
    engine_ms = engine.get("cpu_ms_per_image") if engine else None
    worker_ms = cpu.get("worker")
    return {
        "web": cpu.get("web"),
        "worker": worker_ms,
        "engine": engine_ms,
        "engine_batch": engine.get("batch_size") if engine else None,
        "worker_beyond_engine": round(worker_ms - engine_ms, 1)
        if worker_ms is not None and engine_ms is not None
        else None,
        "client": cpu.get("client"),
        "redis": cpu.get("redis"),
        "total": cpu.get("total"),
    }


def budget(
    *,
    raw_images_per_s: float,
    goal_ratio: float,
    engine_core_ms: float | None,
    client_core_ms: float | None,
    cores: int = CORES,
) -> dict:
    """What one image may cost, in core-ms, for the full path to reach ``goal_ratio`` × raw on ``cores``
    cores, and what is left for the platform (web + worker overhead + broker) after the engine's
    decode + preprocess + forward and the load client."""
    target = raw_images_per_s * goal_ratio
    whole = cores * 1000.0 / target
    spent = (engine_core_ms or 0.0) + (client_core_ms or 0.0)
    return {
        "goal_ratio": goal_ratio,
        "cores": cores,
        "raw_images_per_s": round(raw_images_per_s, 2),
        "target_images_per_s": round(target, 2),
        "whole_image_core_ms": round(whole, 1),
        "engine_core_ms": engine_core_ms,
        "client_core_ms": client_core_ms,
        "left_for_platform_core_ms": round(whole - spent, 1),
    }


def linearity(runs: list[dict], tolerance: float = GOALS["linear_tolerance"]) -> dict:
    """Per-image cost (wall ms per image, and core-ms per image) from the smallest N to the largest:
    "flat" when the largest N costs at most ``tolerance`` more per image than the smallest."""
    done = sorted((r for r in runs if r.get("ms_per_image")), key=lambda r: r["images"])
    if len(done) < 2:
        return {"verdict": None, "growth": None, "core_growth": None}
    first, last = done[0], done[-1]
    growth = round(last["ms_per_image"] / first["ms_per_image"] - 1, 3)
    core_growth = None
    if first.get("core_ms_per_image") and last.get("core_ms_per_image"):
        core_growth = round(last["core_ms_per_image"] / first["core_ms_per_image"] - 1, 3)
    rising = growth > tolerance and (core_growth is None or core_growth > tolerance)
    return {
        "verdict": "rising" if rising else "flat",
        "growth": growth,
        "core_growth": core_growth,
        "from_images": first["images"],
        "to_images": last["images"],
    }


# ---------------------------------------------------------------------------------------------------
# Goals


def goal_checks(report: dict) -> list[dict]:
    """Each goal of issue 12 against this run; ``noisy``: a phase behind the figure ran while other
    processes used the CPUs, so the verdict is not to be trusted."""
    checks: list[dict] = []

    def check(model: str, goal: str, measured, passed: bool | None, noisy: bool) -> None:
        checks.append({"model": model, "goal": goal, "measured": measured, "passed": passed, "noisy": noisy})

    for key, section in report["models"].items():
        minimum = GOALS["full_ratio_min"].get(key)
        for name in GOALS["full_ratio_concurrencies"]:
            value, batch, raw = full_ratio(section, name)
            if minimum is None or batch is None:
                continue
            phase = section["full"][name]
            check(
                key,
                f"full path {name} ≥ {minimum} × raw at the worker's batch {batch}",
                value,
                value is not None and value >= minimum,
                is_noisy(phase) or is_noisy(raw),
            )

        bulk_min = GOALS["bulk_ratio_min"].get(key)
        bulk = bulk_run(section)
        if bulk_min is not None and bulk:
            raw = rate_at(section.get("raw", {}), bulk.get("median_batch"))
            value = ratio(bulk.get("images_per_s"), raw and raw.get("images_per_s"))
            check(
                key,
                f"bulk path ({bulk['images']} images) ≥ {bulk_min} × raw at batch {bulk.get('median_batch')}",
                value,
                value is not None and value >= bulk_min,
                is_noisy(bulk) or is_noisy(raw),
            )

        single, c1 = section.get("raw_single") or {}, section.get("full", {}).get("c1") or {}
        if single.get("p50_ms") is not None and c1.get("p50_ms") is not None:
            over = round(c1["p50_ms"] - single["p50_ms"], 1)
            limit = GOALS["c1_p50_over_raw_ms"]
            check(
                key,
                f"c1 p50 within {limit:.0f} ms of the raw single image ({single['p50_ms']} ms)",
                over,
                over <= limit,
                is_noisy(c1) or is_noisy(single),
            )

        for name in ("c1", "c8"):
            idle = section.get("full", {}).get(name) or {}
            during = section.get("during_bulk", {}).get(name) or {}
            value = ratio(during.get("p99_ms"), idle.get("p99_ms"))
            if value is None:
                continue
            factor = GOALS["during_bulk_p99_factor"]
            check(
                key,
                f"{name} p99 during bulk ≤ {factor} × idle p99",
                value,
                value <= factor,
                is_noisy(during) or is_noisy(idle),
            )

        cpu = cpu_figures(section, GOALS["cpu_phase"])
        if cpu["web"] is not None:
            limit = GOALS["web_core_ms_per_upload"]
            check(key, f"web core-ms per upload ≤ {limit:.0f} (absolute)", cpu["web"], cpu["web"] <= limit, False)
        if cpu["worker_beyond_engine"] is not None:
            limit = GOALS["worker_core_ms_beyond_engine"]
            check(
                key,
                f"worker core-ms per image beyond the engine ≤ {limit:.0f} (absolute)",
                cpu["worker_beyond_engine"],
                cpu["worker_beyond_engine"] <= limit,
                False,
            )

        queries = section.get("queries") or {}
        if queries.get("batch_1") is not None and queries.get("batch_8") is not None:
            check(
                key,
                "worker queries per batch: batch 8 ≤ batch 1",
                f"{queries['batch_1']} → {queries['batch_8']}",
                queries["batch_8"] <= queries["batch_1"],
                False,
            )

        linear = section.get("linear") or {}
        verdict = linearity(linear.get("runs", []))
        if verdict["verdict"] is not None:
            check(
                key,
                f"per-image cost flat from {verdict['from_images']} to {verdict['to_images']} images "
                f"(≤ +{GOALS['linear_tolerance']:.0%})",
                verdict["growth"],
                verdict["verdict"] == "flat",
                any(is_noisy(r) for r in linear.get("runs", [])),
            )
    return checks


def bulk_run(section: dict) -> dict | None:
    """The bulk-path run the bulk goal reads: the largest linear-cost run that completed."""
    runs = [r for r in (section.get("linear") or {}).get("runs", []) if r.get("images_per_s")]
    return max(runs, key=lambda r: r["images"]) if runs else None


# ---------------------------------------------------------------------------------------------------
# Printing


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def star(noisy: bool) -> str:
    return "*" if noisy else ""


def table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return lines


def stands_rows(section: dict) -> list[tuple[str, ...]]:
    """The issue's "Where it stands" table: concurrency | full path img/s | p50 / p99 ms, with the
    worker's batch, the raw rate at that batch and the ratio."""
    rows = []
    for name, phase in (section.get("full") or {}).items():
        value, batch, raw = full_ratio(section, name)
        rows.append(
            (
                name[1:],
                fmt(phase.get("images_per_s")) + star(is_noisy(phase)),
                f"{fmt(phase.get('p50_ms'), 0)} / {fmt(phase.get('p99_ms'), 0)}",
                f"{fmt(phase.get('mean_batch_per_image'), 1)} / {fmt(batch)}",
                fmt(raw and raw.get("images_per_s")) + star(is_noisy(raw)),
                fmt(value, 2),
                f"{fmt(phase.get('lost'))} / {fmt(phase.get('shed_429'))}",
            )
        )
    return rows


def rate_rows(section: dict) -> list[tuple[str, ...]]:
    rows = []
    single = section.get("raw_single") or {}
    for kind, label in (("raw", "raw eager fp32 NCHW (torchvision)"), ("engine", "platform Handler (in-process)")):
        for batch, r in sorted((section.get(kind) or {}).items(), key=lambda item: int(item[0])):
            note = ""
            if kind == "raw" and batch == "1" and single:
                note = f"one image p50 {fmt(single.get('p50_ms'))} ms, p99 {fmt(single.get('p99_ms'))} ms"
            if kind == "engine":
                raw = rate_at(section.get("raw", {}), int(batch))
                note = f"{fmt(ratio(r.get('images_per_s'), raw and raw.get('images_per_s')), 2)} × raw"
            rows.append(
                (
                    label,
                    batch,
                    fmt(r.get("images_per_s")) + star(is_noisy(r)),
                    fmt(r.get("cpu_ms_per_image")),
                    f"{r.get('quiet_trials', '-')}",
                    note,
                )
            )
    return rows


def cpu_rows(section: dict) -> list[tuple[str, ...]]:
    rows = []
    for name in section.get("full") or {}:
        cpu = cpu_figures(section, name)
        rows.append(
            (
                name[1:],
                fmt(cpu["web"]),
                fmt(cpu["worker"]),
                f"{fmt(cpu['engine'])} (b{fmt(cpu['engine_batch'])})",
                fmt(cpu["worker_beyond_engine"]),
                fmt(cpu["client"]),
                fmt(cpu["redis"]),
                fmt(cpu["total"]),
            )
        )
    return rows


def linear_rows(section: dict) -> list[tuple[str, ...]]:
    rows = []
    for r in (section.get("linear") or {}).get("runs", []):
        rows.append(
            (
                fmt(r["images"]),
                fmt(r.get("images_per_s")) + star(is_noisy(r)),
                fmt(r.get("ms_per_image"), 2),
                fmt(r.get("core_ms_per_image")),
                fmt(r.get("median_batch")),
                "capped" if r.get("capped") else "",
            )
        )
    return rows


def budget_lines(section: dict) -> list[str]:
    """The issue's budget arithmetic with this run's figures (at the c32 phase's batch size)."""
    phase_name = "c32" if "c32" in (section.get("full") or {}) else GOALS["cpu_phase"]
    _, batch, raw = full_ratio(section, phase_name)
    if not raw or not raw.get("images_per_s"):
        return []
    cpu = cpu_figures(section, phase_name)
    lines = [
        f"  budget arithmetic ({CORES} cores, raw {fmt(raw['images_per_s'])} img/s at the worker's batch {batch}"
        f" in {phase_name}):"
    ]
    for goal in GOALS["budget_ratios"]:
        b = budget(
            raw_images_per_s=raw["images_per_s"],
            goal_ratio=goal,
            engine_core_ms=cpu["engine"],
            client_core_ms=cpu["client"],
        )
        lines.append(
            f"    at {goal}× = {fmt(b['target_images_per_s'])} img/s the whole image may cost "
            f"{CORES}×1000/{fmt(b['target_images_per_s'])} = {fmt(b['whole_image_core_ms'])} core-ms; the engine "
            f"(decode + preprocess + forward) takes {fmt(cpu['engine'])}, the load client {fmt(cpu['client'])}: "
            f"{fmt(b['left_for_platform_core_ms'])} left for web + worker overhead + Redis "
            f"(measured {fmt(_platform_ms(cpu))})"
        )
    return lines


def _platform_ms(cpu: dict) -> float | None:
    parts = [cpu["web"], cpu["worker_beyond_engine"], cpu["redis"]]
    return round(sum(p for p in parts if p is not None), 1) if cpu["web"] is not None else None


def report_lines(report: dict) -> list[str]:
    meta, cfg = report["meta"], report["settings"]
    out = [
        "",
        f"Sightline benchmark, {meta['started']}, commit {meta['git_commit'][:12]}, {meta['cpu_affinity']} cores, "
        f"torch {meta['torch']} ({cfg['torch_threads']} threads); max batch {cfg['SIGHTLINE_MAX_BATCH_SIZE']}; "
        f"{cfg['image']}; {'QUICK run, tiny N' if cfg['quick'] else 'full run'}",
        "Full path: JWT upload → result.ready on the WebSocket, closed-loop clients. Ratio: full path img/s over the "
        "raw eager fp32 NCHW pipeline at the batch size the worker ran (mean / median per image). "
        "* = other processes used the CPUs meanwhile.",
    ]
    for key, section in report["models"].items():
        out += ["", f"## {key}: {section.get('architecture', '')}", ""]
        out += table(
            (
                "concurrency",
                "full path img/s",
                "p50 / p99 ms",
                "worker batch mean / median",
                "raw img/s at that batch",
                "ratio",
                "lost / 429s retried",
            ),
            stands_rows(section),
        )
        out.append("")
        out += table(("pipeline", "batch", "img/s", "core-ms/img", "quiet trials", "notes"), rate_rows(section))
        out.append("")
        out.append(
            f"  CPU per image (core-ms; engine: the in-process Handler at the worker's batch size; "
            f"goal phase {GOALS['cpu_phase']}):"
        )
        out += [
            "  " + line
            for line in table(
                ("concurrency", "web", "workers", "engine", "workers beyond engine", "client", "redis", "total"),
                cpu_rows(section),
            )
        ]
        during = section.get("during_bulk") or {}
        for name, phase in during.items():
            if not isinstance(phase, dict) or "p99_ms" not in phase:
                continue
            idle = (section.get("full") or {}).get(name) or {}
            out.append(
                f"  {name} during bulk: p50 {fmt(phase.get('p50_ms'), 0)} / p99 {fmt(phase.get('p99_ms'), 0)} "
                f"ms (idle p99 {fmt(idle.get('p99_ms'), 0)}); bulk moved "
                f"{fmt(phase.get('bulk_images_per_s_meanwhile'))} img/s meanwhile"
                + ("; BACKLOG RAN OUT" if phase.get("bulk_ran_out") else "")
                + star(is_noisy(phase))
            )
        queries = section.get("queries") or {}
        if queries:
            out.append(
                f"  queries: {fmt(queries.get('upload'))} per upload (web, {queries.get('upload_how', '')}); "
                f"per worker batch {fmt(queries.get('batch_1'))} at batch 1, {fmt(queries.get('batch_8'))} at "
                f"batch {fmt(queries.get('batch_8_size'))} ({queries.get('batch_how', '')})"
            )
        linear = section.get("linear") or {}
        if linear.get("runs"):
            verdict = linearity(linear["runs"])
            out.append(
                f"  linear cost ({linear.get('path', '')}): {verdict['verdict'] or '-'} "
                f"(ms/img {fmt(verdict['growth'], 3)}, core-ms/img {fmt(verdict['core_growth'], 3)} "
                "growth, smallest → largest N)"
            )
            out += [
                "  " + line
                for line in table(
                    ("images", "img/s", "ms/img", "core-ms/img", "median batch", ""), linear_rows(section)
                )
            ]
        if key == "resnet18":
            out += budget_lines(section)
    out += ["", "## Goals (issue 12)", ""]
    rows = []
    for c in report["goal_checks"]:
        state = "-" if c["passed"] is None else ("PASS" if c["passed"] else "FAIL")
        rows.append((c["model"], c["goal"], fmt(c["measured"], 2), state + star(c["noisy"])))
    out += table(("model", "goal", "measured", "verdict"), rows)
    if any(c["noisy"] for c in report["goal_checks"]):
        out.append(
            f"  * other processes used ≥ {QUIET_CORES} cores during a phase behind this figure (or a rate had "
            "too few quiet trials): run again on a quiet machine before trusting it"
        )
    out.append(
        f"\nload average {meta['load_average_at_start']} at start, {meta.get('load_average_at_end')} at end; "
        f"{meta.get('seconds')} s in all"
    )
    return out


def print_report(report: dict) -> None:
    print("\n".join(report_lines(report)))
