"""`onpolicy pipeline FILE.yaml`: the whole method in one command, and a report a person can look at.

    onpolicy pipeline recipes/tiny/pipeline.yaml            # scripts/run.sh runs this
    onpolicy pipeline recipes/tiny/pipeline.yaml --plan     # print the plan and stop

Each stage is its own process running the same `onpolicy train RECIPE` a user would run, chained
explicitly: a stage's `model.init_from` is the export of the stage it names (`init_from: ar` means
`<output_dir>/ar/final`; stage 4 hands on its `best`). A finished stage (its `final/` exported) is
skipped on a re-run; an interrupted one resumes from its own last checkpoint (every trainer resumes
by default). Then every stage's model is evaluated (validation, held-out and repair tasks), the last
one is benchmarked against the AR baseline, and `report.md` / `report.json` with PNGs and a replay
page are written into the output folder.

The file (see recipes/tiny/pipeline.yaml):

    name: tiny                        # the run's name in titles and legends
    output_dir: runs/pipeline-tiny
    overrides: [train.threads=2]      # applied to every stage (optional)
    stages:
      - {name: ar, recipe: recipes/tiny/tasks_ar.yaml, overrides: [train.max_steps=200], minutes: 9}
      - {name: stage1, recipe: recipes/tiny/tasks_from_ar.yaml, init_from: ar, minutes: 7}
      ...
    eval: {limit: 100, fast_threshold: 0.9}
    bench: {ar: ar, before: stage1, after: stage4, limit: 40, thresholds: [0.9, 0.7, 0.5]}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from onpolicy.errors import ConfigError, yaml_problem
from onpolicy.recipes import find_recipe

STAGE_KEYS = ("name", "recipe", "init_from", "overrides", "minutes", "hand_on")


@dataclass
class Stage:
    name: str
    recipe: str
    init_from: str | None = None  # an earlier stage's name
    overrides: list[str] = field(default_factory=list)
    minutes: float = 0.0  # the estimate printed in the plan (measured on our 2-core CPU)
    hand_on: str = "best"  # what later steps take: "best" (stage 4's validated best/, when it exists) or
    # "final"


@dataclass
class EvalSpec:
    limit: int = 100  # tasks per task set
    fast_threshold: float = 0.9  # the fast decoding measured beside one token per step
    max_new_tokens: int = 96
    minutes: float = 0.0


@dataclass
class BenchSpec:
    ar: str = "ar"
    before: str | None = None  # the diffusion model before the later stages (e.g. stage1)
    after: str | None = None  # default: the last stage
    tasks: str = "generated:heldout"
    limit: int = 40
    thresholds: list[float] = field(default_factory=lambda: [0.9, 0.7, 0.5])
    batch_sizes: list[int] = field(default_factory=lambda: [1])  # e.g. [1, 16]: the frontier at each
    # The verdict (optional): the fast setting is chosen on `validation` (never on `tasks`, the test
    # slice): the fewest forwards per token whose pass@1 there is at most `tolerance` below the AR
    # model's; `tasks` then measures it once, beside AR, and the report's first line says the result.
    validation: str | None = None
    validation_limit: int = 300
    choose_from: list[float] = field(default_factory=lambda: [0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    tolerance: float = 0.02
    claim: float = 3.0  # the speed-up (AR's tokens/s at batch 1) the verdict asks for
    minutes: float = 0.0


@dataclass
class Pipeline:
    name: str
    output_dir: Path
    stages: list[Stage]
    overrides: list[str] = field(default_factory=list)
    eval: EvalSpec = field(default_factory=EvalSpec)
    bench: BenchSpec = field(default_factory=BenchSpec)
    source: str = ""
    seed: int | None = None  # --seed: every stage's train.seed (init, data order, sampling)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def hand_on(self, name: str) -> Path:
        """The model folder a stage hands on to later stages, eval and bench."""
        return model_folder(self.output_dir / name, self.stage(name).hand_on)


def _check(data: dict, allowed, where: str, path: Path) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{path}: unknown key '{where}{unknown[0]}'; valid keys: {', '.join(allowed)}")


def load_pipeline(path: str | Path, seed: int | None = None) -> Pipeline:
    """Read and check a pipeline file: keys, recipe files, stage names and their order. With `seed`,
    every stage runs with train.seed=seed and the output folder gets a -seedN suffix."""
    try:
        path = find_recipe(path)  # a file here, else a shipped pipeline
    except FileNotFoundError:
        raise ConfigError(f"pipeline file not found: {path}") from None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(yaml_problem(path, e)) from None
    _check(data, ("name", "output_dir", "overrides", "stages", "eval", "bench"), "", path)
    if not data.get("stages"):
        raise ConfigError(f"{path}: no stages")
    stages, seen = [], set()
    for i, raw in enumerate(data["stages"]):
        _check(raw, STAGE_KEYS, f"stages[{i}].", path)
        if "name" not in raw or "recipe" not in raw:
            raise ConfigError(f"{path}: stages[{i}] needs a name and a recipe")
        stage = Stage(**raw)
        if stage.hand_on not in ("best", "final"):
            raise ConfigError(f"{path}: stages[{i}].hand_on='{stage.hand_on}' is not one of: best, final")
        if stage.name in seen:
            raise ConfigError(f"{path}: two stages are named '{stage.name}'")
        if stage.init_from is not None and stage.init_from not in seen:
            raise ConfigError(f"{path}: stage '{stage.name}' starts from '{stage.init_from}', which is not "
                              "an earlier stage")
        try:
            stage.recipe = str(find_recipe(stage.recipe))  # a file here, else a shipped recipe
        except FileNotFoundError:
            raise ConfigError(f"{path}: stage '{stage.name}': recipe not found: {stage.recipe}") from None
        seen.add(stage.name)
        stages.append(stage)
    ev, be = data.get("eval") or {}, data.get("bench") or {}
    _check(ev, [f.name for f in fields(EvalSpec)], "eval.", path)
    _check(be, [f.name for f in fields(BenchSpec)], "bench.", path)
    bench = BenchSpec(**be)
    for key in ("ar", "before", "after"):
        if getattr(bench, key) is not None and getattr(bench, key) not in seen:
            raise ConfigError(f"{path}: bench.{key}='{getattr(bench, key)}' is not a stage")
    if bench.validation is not None and bench.validation.split(":")[:2] == bench.tasks.split(":")[:2] \
            and "skip=" not in bench.validation:
        raise ConfigError(f"{path}: bench.validation='{bench.validation}' would overlap the test slice "
                          "bench.tasks="
                          f"'{bench.tasks}'; use another task set or a skip= past the test slice")
    out = Path(data.get("output_dir") or f"runs/pipeline-{path.stem}")
    overrides = list(data.get("overrides") or [])
    if seed is not None:
        out = out.with_name(f"{out.name}-seed{seed}")
        overrides.append(f"train.seed={seed}")
    return Pipeline(str(data.get("name") or path.stem), out, stages, overrides, EvalSpec(**ev), bench,
                    str(path), seed)


def model_folder(run: Path, hand_on: str = "best") -> Path:
    """What a stage hands on: stage 4's best checkpoint by its stated rule (unless `hand_on` is
    "final"), else the final export."""
    best = hand_on == "best" and (run / "best" / "config.json").is_file()
    return run / "best" if best and (run / "final" / "config.json").is_file() else run / "final"


def finished(run: Path) -> bool:
    return (run / "final" / "config.json").is_file() and (run / "summary.json").is_file()


def plan(p: Pipeline) -> str:
    lines = [f"pipeline '{p.name}' ({p.source}) -> {p.output_dir}"]
    total = 0.0
    for i, s in enumerate(p.stages, 1):
        run = p.output_dir / s.name
        state = ("done, skipped" if finished(run)
                 else "resumes" if (run / "checkpoints").is_dir() else "to run")
        start = f" from {s.init_from}" if s.init_from else ""
        lines.append(f"  {i}. {s.name:<8} {s.recipe}{start}  ~{s.minutes:g} min  [{state}]")
        total += 0 if finished(run) else s.minutes
    lines.append(f"  {len(p.stages) + 1}. eval     every stage's model on generated:validation, "
                 "generated:heldout, "
                 f"repair:heldout ({p.eval.limit} each)  ~{p.eval.minutes:g} min")
    lines.append(f"  {len(p.stages) + 2}. bench    {p.bench.after or p.stages[-1].name} vs {p.bench.ar} (AR)"
                 + (f" and {p.bench.before}" if p.bench.before else "")
                 + f", batch 1  ~{p.bench.minutes:g} min")
    evaluated = all((p.output_dir / s.name / "pipeline_eval.json").is_file() for s in p.stages)
    total += 0 if evaluated else p.eval.minutes
    total += 0 if (p.output_dir / "bench.json").is_file() else p.bench.minutes
    lines.append(f"  estimate: ~{total:.0f} min left (the minutes the file gives each step)")
    return "\n".join(lines)


def run_stage(p: Pipeline, stage: Stage, log) -> float:
    """One stage through `onpolicy train` in its own process; returns its wall time."""
    run = p.output_dir / stage.name
    cmd = [sys.executable, "-m", "onpolicy.cli", "train", stage.recipe, *p.overrides, *stage.overrides,
           f"logging.output_dir={run}", "logging.progress=false"]
    if stage.init_from:
        cmd.append(f"model.init_from={p.hand_on(stage.init_from)}")
    run.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    with (run / "pipeline.log").open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        said = time.perf_counter()
        while (code := proc.poll()) is None:
            time.sleep(2)
            if time.perf_counter() - said >= 50:  # a line at least once a minute
                log(progress_line(stage.name, run, time.perf_counter() - tic))
                said = time.perf_counter()
    seconds = time.perf_counter() - tic
    if code != 0:
        tail = "".join((run / "pipeline.log").read_text().splitlines(keepends=True)[-15:])
        raise ConfigError(f"stage '{stage.name}' failed (exit {code}); its log: "
                          f"{run / 'pipeline.log'}\n{tail}")
    times = _read_json(run / "pipeline_time.json", {"attempts": []})
    times["attempts"].append(round(seconds, 1))
    (run / "pipeline_time.json").write_text(json.dumps(times))
    return seconds


KEY_METRICS = ("val/loss", "train/loss", "reward/pass_rate", "loss")  # the first a stage logs is shown


def progress_line(name: str, run: Path, elapsed: float) -> str:
    """stage, step/total, its key metric, elapsed and remaining minutes (by the measured step time),
    read from the stage's own metrics.jsonl and config.yaml."""
    rows = _stage_rows(run)
    total = _max_steps(run)
    if not rows:
        return f"[pipeline] {name}: starting ({elapsed / 60:.1f} min; building caches or the first step)"
    last, first = rows[-1], rows[0]
    step = int(last.get("step", 0))
    metric = next((f"{k} {last[k]:.4g}" for k in KEY_METRICS if isinstance(last.get(k), (int, float))), "")
    if not metric:
        metric = next((f"{k} {r[k]:.4g}" for r in reversed(rows) for k in KEY_METRICS
                       if isinstance(r.get(k), (int, float))), "")
    rate = (last["time"] - first["time"]) / max(1, step - int(first.get("step",
                                                                        0))) if len(rows) > 1 else None
    left = f", ~{rate * (total - step) / 60:.0f} min left" if rate and total else ""
    metric = f", {metric}" if metric else ""
    return f"[pipeline] {name}: step {step}/{total or '?'}{metric}, {elapsed / 60:.1f} min{left}"


def _stage_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written
    rows = [r for r in rows if "time" in r]
    # a resumed attempt's clock restarts
    starts = [i for i in range(1, len(rows)) if rows[i]["time"] < rows[i - 1]["time"]]
    return rows[starts[-1]:] if starts else rows


def _max_steps(run: Path) -> int | None:
    try:
        return int((yaml.safe_load((run / "config.yaml").read_text())
                    or {}).get("train", {}).get("max_steps"))
    except (OSError, TypeError, ValueError, yaml.YAMLError):
        return None


def _die_with_parent() -> None:
    """In the stage's process: end when the pipeline does (even by kill -9), so a re-run never finds
    an orphan still training the same stage (Linux: PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def evaluate_stages(p: Pipeline, log) -> dict:
    """pass@1 (95% Wilson intervals) and tokens per forward of every stage's model, cached per stage."""
    from onpolicy.data.tasks import load_task_set
    from onpolicy.evaluation import evaluate_checkpoint
    from onpolicy.loading import load_model
    from onpolicy.sampling import SamplerConfig
    from verifiers import PythonTestVerifier

    out = {}
    sets = {name: load_task_set(name, p.eval.limit, 0)
            for name in ("generated:validation", "generated:heldout", "repair:heldout")}
    slow = SamplerConfig(max_new_tokens=p.eval.max_new_tokens)
    fast = SamplerConfig(max_new_tokens=p.eval.max_new_tokens, threshold=p.eval.fast_threshold)
    with PythonTestVerifier() as verifier:
        for stage in p.stages:
            cache = p.output_dir / stage.name / "pipeline_eval.json"
            if (cached := fresh_cache(cache, [p.output_dir / stage.name])) is not None:
                out[stage.name] = cached
                continue
            tic = time.perf_counter()
            model, tokenizer = load_model(str(p.hand_on(stage.name)))
            causal = model.config.attention == "causal"
            result = {"model": str(p.hand_on(stage.name)), "attention": model.config.attention}
            for set_name, tasks in sets.items():
                for setting, cfg in (("one_per_step", slow), ("fast", fast)):
                    if setting == "fast" and (causal or set_name != "generated:heldout"):
                        # an AR model has no faster setting; the fast one is measured where it is compared
                        continue
                    r = evaluate_checkpoint(model, tokenizer, tasks, cfg, 1, verifier, 8, 0)
                    result[f"{set_name}/{setting}"] = {"pass@1": r["pass@1"], "pass@1_ci95": r["pass@1_ci95"],
                                                       "tokens_per_forward": r["tokens_per_forward"],
                                                       "n": len(tasks)}
            result["seconds"] = round(time.perf_counter() - tic, 1)
            cache.write_text(json.dumps(result, indent=1))
            out[stage.name] = result
            log(f"[pipeline] eval {stage.name}: held-out pass@1 "
                f"{result['generated:heldout/one_per_step']['pass@1']:.3f}, "
                f"validation {result['generated:validation/one_per_step']['pass@1']:.3f}")
    return out


def choose_setting(p: Pipeline, log) -> dict | None:
    """The verdict's setting, chosen on the validation tasks before the test slice is decoded: the
    last model at one token per step and at each threshold of `bench.choose_from`, the AR model at
    one token per step, greedy; the fewest forwards per token whose pass@1 is at most `tolerance`
    below AR's (none: the verdict says so). Cached in choice.json."""
    from onpolicy.data.tasks import load_task_set
    from onpolicy.evaluation import evaluate_checkpoint, fastest_within
    from onpolicy.loading import load_model
    from onpolicy.sampling import SamplerConfig
    from verifiers import PythonTestVerifier

    b = p.bench
    if b.validation is None:
        return None
    out, after = p.output_dir / "choice.json", b.after or p.stages[-1].name
    if (cached := fresh_cache(out, [p.output_dir / after, p.output_dir / b.ar])) is not None:
        return cached
    tasks, block = load_task_set(b.validation, b.validation_limit, 0), _block_size(p.hand_on(after))
    rows = []
    with PythonTestVerifier() as verifier:
        model, tokenizer = load_model(str(p.hand_on(b.ar)))
        r = evaluate_checkpoint(model, tokenizer, tasks, SamplerConfig(max_new_tokens=p.eval.max_new_tokens),
                                1, verifier, 8, 0)
        ar = {"pass@1": r["pass@1"], "pass@1_ci95": r["pass@1_ci95"]}
        log(f"[pipeline] choice: AR validation pass@1 {ar['pass@1']:.3f} ({len(tasks)} tasks, "
            f"{b.validation})")
        model, tokenizer = load_model(str(p.hand_on(after)))
        for threshold in [None, *b.choose_from]:
            cfg = SamplerConfig(max_new_tokens=p.eval.max_new_tokens, block_size=block, threshold=threshold)
            r = evaluate_checkpoint(model, tokenizer, tasks, cfg, 1, verifier, 8, 0)
            rows.append({"threshold": threshold, "pass@1": r["pass@1"], "pass@1_ci95": r["pass@1_ci95"],
                         "tokens_per_forward": r["tokens_per_forward"]})
            log(f"[pipeline] choice: {after} threshold {threshold or 'one token per step'}: validation "
                "pass@1 "
                f"{r['pass@1']:.3f} at {r['tokens_per_forward']:.2f} tokens per forward")
    chosen = fastest_within(rows, ar["pass@1"], b.tolerance)
    result = {"validation": b.validation, "n": len(tasks), "tolerance": b.tolerance, "block_size": block,
              "ar": ar, "settings": rows, "chosen": chosen}
    out.write_text(json.dumps(result, indent=1))
    return result


def bench_last(p: Pipeline, choice: dict | None = None) -> dict:
    """`onpolicy bench` of the last stage against the AR baseline (and the model before) at each of
    `bench.batch_sizes`, with the chosen setting (if any) among the thresholds."""
    b = p.bench
    out = p.output_dir / "bench.json"
    after = b.after or p.stages[-1].name
    runs = [p.output_dir / name for name in (after, b.ar, b.before) if name]
    if (cached := fresh_cache(out, runs)) is not None:
        return cached
    thresholds = list(b.thresholds)
    if (choice and choice["chosen"] and choice["chosen"]["threshold"] is not None
            and choice["chosen"]["threshold"] not in thresholds):
        thresholds.append(choice["chosen"]["threshold"])
    cmd = [sys.executable, "-m", "onpolicy.cli", "bench", str(p.hand_on(after)),
           "--ar", str(p.hand_on(b.ar)), "--tasks", b.tasks, "--limit", str(b.limit),
           "--block-sizes", str(_block_size(p.hand_on(after))), "--thresholds", *map(str, thresholds),
           "--batch-sizes", *map(str, b.batch_sizes), "--out", str(out), "--png",
           str(p.output_dir / "frontier.png")]
    if b.before:
        cmd += ["--before", str(p.hand_on(b.before))]
    with (p.output_dir / "bench.log").open("w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise ConfigError(f"bench failed (exit {code}); its log: {p.output_dir / 'bench.log'}")
    return json.loads(out.read_text())


def newer_than(result: Path, runs: list[Path]) -> bool:
    """Whether a model one of `runs` hands on was written after `result` (a stage re-run since): the
    cached result measured models that are gone."""
    written = result.stat().st_mtime
    return any(f.stat().st_mtime > written for run in runs for f in model_folder(run).iterdir())


def fresh_cache(result: Path, runs: list[Path]) -> dict | None:
    """A cached evaluation or bench of `runs`' models, or None when it is missing or older than one of
    them."""
    return json.loads(result.read_text()) if result.is_file() and not newer_than(result, runs) else None


def _block_size(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text()).get("block_size", 32))


def main(args) -> int:
    from onpolicy.report import write_report

    p = load_pipeline(args.pipeline, getattr(args, "seed", None))
    print(plan(p), flush=True)
    if args.plan:
        return 0
    p.output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"{message}  [{(time.perf_counter() - start) / 60:.1f} min]", flush=True)

    for i, stage in enumerate(p.stages, 1):
        run = p.output_dir / stage.name
        if finished(run):
            log(f"[pipeline] {i}/{len(p.stages)} {stage.name}: finished earlier, skipped")
            continue
        log(f"[pipeline] {i}/{len(p.stages)} {stage.name}: onpolicy train {stage.recipe}"
            + (" (resuming from its last checkpoint)" if (run / "checkpoints").is_dir() else "")
            + f", log {run / 'pipeline.log'}")
        seconds = run_stage(p, stage, log)
        log(f"[pipeline] {stage.name} done in {seconds / 60:.1f} min")
    evals = evaluate_stages(p, log)
    choice = choose_setting(p, log)
    log("[pipeline] bench: " + " ".join(f"batch {n}" for n in p.bench.batch_sizes)
        + f", {p.bench.limit} tasks of {p.bench.tasks}" + f", log {p.output_dir / 'bench.log'}")
    bench = bench_last(p, choice)
    log("[pipeline] bench done")
    report = write_report(p, evals, bench, choice)
    log(f"[pipeline] report: {p.output_dir / 'report.md'} (and report.json, PNGs, replay.html); "
        f"held-out pass@1 {report['summary']['last_pass@1']:.3f}, {report['summary']['speed_vs_ar']:.2f}x "
        "AR's tokens/s")
    return 0
