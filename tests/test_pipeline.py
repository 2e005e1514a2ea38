"""The pipeline runner (train/pipeline.py) with fake in-process stages, plus a short real run
of data + retrieve on Gift Cards, and the `python -m train` dispatcher."""
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import train.__main__ as cli
from train import pipeline
from train.pipeline import PipelineConfig, PipelineError, Stage
from ulmrec.config import parse_config
from ulmrec.data.dataset import SOURCES, data_root
from ulmrec.paths import runs_root


@dataclass
class FakeConfig:
    dataset: str = ""
    size: int = 1
    seed: int = 0
    threads: int = 0
    resume: bool = True


def fake_stages(monkeypatch, names=("a", "b", "c"), config=FakeConfig, fail=()):
    """Stages whose run(cfg) records its call and writes runs/out/<name>.out (its output)."""
    calls = []
    stages = []
    for name in names:
        def run(cfg, name=name):
            calls.append({"stage": name, "cfg": cfg})
            if name in fail:
                raise RuntimeError(f"stage {name} broke")
            out = runs_root() / "out" / f"{name}.out"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(cfg.__dict__))
            return {"stage": name}
        mod = types.ModuleType(f"fake_stage_{name}")
        mod.run, mod.Config = run, config
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        stages.append(Stage(name, mod.__name__, "Config",
                            lambda cfg, name=name: [runs_root() / "out" / f"{name}.out"]))
    return tuple(stages), calls


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A dataset folder (only its bytes matter to the fingerprint) and empty runs/ and cache/."""
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("ULMREC_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "Toy_5.json").write_text('{"reviewerID": "u", "asin": "i"}\n')
    (folder / "meta_Toy.json").write_text('{"asin": "i", "title": "t"}\n')
    return str(folder)


def run(stages, spec, **flags):
    return pipeline.run(PipelineConfig(**flags), spec, stages)


def ran(calls):
    return [c["stage"] for c in calls]


def state_of(toy):
    return json.loads((runs_root() / Path(toy).name / "pipeline" / "state.json").read_text())


def test_unknown_stage_is_an_error_before_anything_runs(toy, monkeypatch):
    stages, calls = fake_stages(monkeypatch)
    with pytest.raises(PipelineError, match="unknown stage.*retreive"):
        run(stages, {"dataset": toy, "a": {}, "retreive": {"size": 2}})
    assert calls == [] and not runs_root().exists()


def test_unknown_key_names_the_stage_and_the_key(toy, monkeypatch):
    stages, calls = fake_stages(monkeypatch)
    with pytest.raises(PipelineError, match=r"stage c: unknown key\(s\) sise"):
        run(stages, {"dataset": toy, "a": {}, "b": {}, "c": {"sise": 3}})
    assert calls == []  # a and b come first, yet nothing ran
    with pytest.raises(PipelineError, match="stage b: expected a mapping"):
        run(stages, {"dataset": toy, "b": [1, 2]})
    with pytest.raises(PipelineError, match="no dataset"):
        run(stages, {"a": {}})


@dataclass
class ChoiceConfig(FakeConfig):
    mode: str = field(default="fast", metadata={"choices": ("fast", "slow")})
    tasks: tuple[str, ...] = field(default=("x",), metadata={"choices": ("x", "y")})


def test_a_value_outside_its_choices_is_an_error_from_yaml_too(toy, monkeypatch, tmp_path):
    stages, calls = fake_stages(monkeypatch, config=ChoiceConfig)
    with pytest.raises(PipelineError, match=r"stage b: mode: 'fsat' is not one of fast, slow"):
        run(stages, {"dataset": toy, "a": {}, "b": {"mode": "fsat"}})
    with pytest.raises(PipelineError, match=r"stage a: tasks: 'z' is not one of x, y"):
        run(stages, {"dataset": toy, "a": {"tasks": ["x", "z"]}})
    assert calls == []
    # a stage's own CLI: argparse checks the flags, the same check covers its --config file
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: fsat\n")
    with pytest.raises(SystemExit):
        parse_config(ChoiceConfig, ["--config", str(bad)])
    assert parse_config(ChoiceConfig, ["--config", str(bad), "--mode", "slow"]).mode == "slow"
    assert parse_config(ChoiceConfig, ["--tasks", "y", "x"]).tasks == ("y", "x")


def test_stages_run_in_order_with_shared_keys_and_state(toy, monkeypatch):
    stages, calls = fake_stages(monkeypatch)
    # sections in the YAML in another order; b is off, c alone runs with its defaults
    assert run(stages, {"seed": 7, "c": None, "b": {"skip": True, "size": 5}, "dataset": toy,
                        "a": {"size": 2}}) == 0
    assert ran(calls) == ["a", "c"]
    # a first run starts fresh: whatever the folder holds was not made by this pipeline
    assert calls[0]["cfg"] == FakeConfig(dataset=toy, size=2, seed=7, resume=False)
    assert calls[1]["cfg"] == FakeConfig(dataset=toy, size=1, seed=7, resume=False)
    # each section is kept beside the state as a record: `--config` reruns that stage alone
    record = runs_root() / Path(toy).name / "pipeline" / "a.yaml"
    assert parse_config(FakeConfig, ["--config", str(record)]) == FakeConfig(dataset=toy, size=2, seed=7)
    state = state_of(toy)
    assert set(state["stages"]) == {"a", "c"}
    for name in ("a", "c"):
        entry = state["stages"][name]
        assert entry["status"] == "done" and len(entry["key"]) == 64
        assert entry["finished_at"] and entry["seconds"] >= 0
        assert entry["outputs"] == [str((runs_root() / "out" / f"{name}.out").resolve())]


def test_second_run_skips_current_stages(toy, monkeypatch, capsys):
    stages, calls = fake_stages(monkeypatch)
    spec = {"dataset": toy, "a": {}, "b": {"size": 2}, "c": {}}
    assert run(stages, spec) == 0
    assert run(stages, spec) == 0
    assert ran(calls) == ["a", "b", "c"]
    assert capsys.readouterr().out.count("skipped (current)") == 3
    # how a stage runs (threads, resume) is not what it makes: still current
    assert run(stages, {**spec, "b": {"size": 2, "threads": 1, "resume": False}}) == 0
    assert ran(calls) == ["a", "b", "c"]


def test_changed_section_reruns_that_stage_and_every_later_one_from_scratch(toy, monkeypatch):
    stages, calls = fake_stages(monkeypatch)
    spec = {"dataset": toy, "a": {}, "b": {"size": 2}, "c": {}}
    run(stages, spec)
    calls.clear()
    assert run(stages, {**spec, "b": {"size": 3}}) == 0
    assert ran(calls) == ["b", "c"]
    # a finished run with another key must not be continued: both start over
    assert all(not c["cfg"].resume for c in calls)
    calls.clear()
    assert run(stages, {**spec, "b": {"size": 3}, "seed": 1}) == 0  # the seed reaches every stage
    assert ran(calls) == ["a", "b", "c"]


def test_changed_data_reruns_everything(toy, monkeypatch):
    stages, calls = fake_stages(monkeypatch)
    spec = {"dataset": toy, "a": {}, "b": {}}
    run(stages, spec)
    (Path(toy) / "Toy_5.json").write_text('{"reviewerID": "v", "asin": "j"}\n')
    run(stages, spec)
    assert ran(calls) == ["a", "b", "a", "b"]


def test_from_and_only_force_stages(toy, monkeypatch):
    stages, calls = fake_stages(monkeypatch)
    spec = {"dataset": toy, "a": {}, "b": {}, "c": {}}
    run(stages, spec)
    calls.clear()
    assert run(stages, spec, from_stage="b") == 0
    assert ran(calls) == ["b", "c"]
    calls.clear()
    assert run(stages, spec, only="b") == 0
    assert ran(calls) == ["b"]
    with pytest.raises(PipelineError, match="--from x: unknown stage"):
        run(stages, spec, from_stage="x")
    # the flag is --from; the old --from-stage still parses (unlisted in --help)
    yaml_file = Path(toy).parent / "p.yaml"
    yaml_file.write_text(f"dataset: {toy}\na: {{}}\n")
    for flag in ("--from", "--from-stage"):
        cfg = parse_config(PipelineConfig, ["--config", str(yaml_file), flag, "b", "--dry-run"])
        assert (cfg.from_stage, cfg.dry_run, cfg.dataset) == ("b", True, toy)


def test_deleted_output_reruns_that_stage_and_later(toy, monkeypatch):
    stages, calls = fake_stages(monkeypatch)
    spec = {"dataset": toy, "a": {}, "b": {}, "c": {}}
    run(stages, spec)
    (runs_root() / "out" / "b.out").unlink()
    calls.clear()
    run(stages, spec)
    assert ran(calls) == ["b", "c"]


def test_failed_stage_stops_the_pipeline_and_resumes_next_time(toy, monkeypatch, capsys):
    stages, calls = fake_stages(monkeypatch, fail=("b",))
    spec = {"dataset": toy, "a": {}, "b": {}, "c": {}}
    assert run(stages, spec) == 1
    assert ran(calls) == ["a", "b"]
    assert state_of(toy)["stages"]["b"]["status"] == "failed"
    assert "failed" in capsys.readouterr().out
    stages, calls = fake_stages(monkeypatch)  # b works now
    assert run(stages, spec) == 0
    assert ran(calls) == ["b", "c"]
    # b resumes its own interrupted run (same key); c never ran, so it starts fresh
    assert calls[0]["cfg"].resume and not calls[1]["cfg"].resume


def test_stage_without_its_outputs_counts_as_failed(toy, monkeypatch):
    stages, calls = fake_stages(monkeypatch)
    stages = (stages[0], Stage("b", stages[1].module, "Config", lambda cfg: [runs_root() / "never"]))
    assert run(stages, {"dataset": toy, "a": {}, "b": {}}) == 1
    assert ran(calls) == ["a", "b"]
    assert state_of(toy)["stages"]["b"]["status"] == "failed"


def test_state_is_written_atomically(toy, monkeypatch):
    stages, _ = fake_stages(monkeypatch)
    spec = {"dataset": toy, "a": {}, "b": {}}
    run(stages, spec)
    folder = runs_root() / Path(toy).name / "pipeline"
    before = (folder / "state.json").read_text()
    real = Path.write_text

    def torn(self, text, *args, **kwargs):  # a crash halfway through writing the state
        if self.name.startswith("state.json"):
            real(self, text[: len(text) // 2])
            raise OSError("disk full")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError, match="disk full"):
        run(stages, {**spec, "b": {"size": 9}})
    monkeypatch.setattr(Path, "write_text", real)
    assert (folder / "state.json").read_text() == before
    assert sorted(p.name for p in folder.iterdir()) == ["a.yaml", "b.yaml", "state.json"]


def test_evaluate_and_export_take_finetune_and_evaluate_keys(toy, monkeypatch):
    @dataclass
    class Finetune:
        dataset: str = ""
        run_name: str = "ulmrec"
        max_len: int = 1536
        batch_size: int = 4

    @dataclass
    class Evaluate:
        dataset: str = ""
        max_len: int = 1536
        batch_size: int = 8
        results_dir: str = "results"

    @dataclass
    class Export:
        dataset: str = ""
        run_name: str = "ulmrec"
        results_dir: str = "results"
        config_file: str | None = None

    stages = ()
    for name, cls in (("finetune", Finetune), ("evaluate", Evaluate), ("export", Export)):
        stages += fake_stages(monkeypatch, (name,), cls)[0]
    spec = {"dataset": toy, "finetune": {"run_name": "demo", "max_len": 640, "batch_size": 2},
            "evaluate": {"results_dir": "out"}, "export": {}}
    sections = pipeline.build_sections(spec, PipelineConfig(), stages, Path("configs/demo.yaml"))
    assert sections["evaluate"] == {"dataset": toy, "results_dir": "out", "max_len": 640}
    assert sections["export"] == {"dataset": toy, "run_name": "demo", "results_dir": "out",
                                  "config_file": str(Path("configs/demo.yaml").resolve())}
    spec["evaluate"]["max_len"] = 512  # a stage's own value wins
    assert pipeline.build_sections(spec, PipelineConfig(), stages, None)["evaluate"]["max_len"] == 512


def test_dry_run_says_why_and_runs_nothing(toy, monkeypatch, capsys):
    stages, calls = fake_stages(monkeypatch)
    spec = {"dataset": toy, "a": {}, "b": {}, "c": {}}
    run(stages, {**spec, "c": {"skip": True}})
    capsys.readouterr()
    calls.clear()
    assert run(stages, {**spec, "b": {"size": 4}}, dry_run=True) == 0
    out = capsys.readouterr().out
    assert calls == []
    assert "a            skip  current" in out
    assert "b            run   its section changed" in out
    assert "c            run   no previous run" in out
    assert state_of(toy)["stages"]["b"]["section"] == {"dataset": toy}


def test_cli_lists_commands_and_names_a_missing_module(monkeypatch, capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("run", "retrieve", "export", "push"))
    assert cli.main(["fly"]) == 2 and "unknown command 'fly'" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "push", ("train.no_such_module", "upload"))
    assert cli.main(["push"]) == 2
    assert "train.no_such_module" in capsys.readouterr().err


def test_demo_pipeline_validates(monkeypatch, tmp_path, capsys):
    if not (data_root() / SOURCES["gift-cards"][1]).is_dir():
        pytest.skip("shared data not found")
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path / "runs"))
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert cli.main(["run", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name:<12} run" in out for name in ("data", "retrieve", "index", "export"))


def test_data_and_retrieve_on_gift_cards_run_once(monkeypatch, tmp_path, capsys):
    if not (data_root() / SOURCES["gift-cards"][1]).is_dir():
        pytest.skip("shared data not found")
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("ULMREC_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "pipe.yaml"
    config.write_text("dataset: gift-cards\ndata: {}\nretrieve: {model: lrurec, hidden: 16, "
                      "max_epochs: 1, threads: 1}\n")
    assert pipeline.main(["--config", str(config)]) == 0
    out = tmp_path / "runs" / "gift-cards" / "retrieval" / "lrurec" / "candidates.parquet"
    assert out.exists() and next((tmp_path / "cache" / "data").glob("gift-cards-*/info.json"))
    first = out.stat().st_mtime_ns
    capsys.readouterr()
    assert pipeline.main(["--config", str(config)]) == 0
    table = capsys.readouterr().out
    assert "data         skipped (current)" in table and "retrieve     skipped (current)" in table
    assert out.stat().st_mtime_ns == first


def test_export_carries_the_lcrec_run_of_the_pipeline(monkeypatch, tmp_path):
    if not (data_root() / SOURCES["gift-cards"][1]).is_dir():
        pytest.skip("shared data not found")
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    spec = {"dataset": "gift-cards", "lcrec": {"tag": "small", "max_steps": 3}, "export": {}}
    sections = pipeline.build_sections(spec, PipelineConfig(), pipeline.STAGES, None)
    assert sections["export"]["lcrec"] == str(tmp_path / "gift-cards" / "lcrec" / "small")
    assert [s.name for s in pipeline.STAGES][-3:] == ["lcrec", "decode", "export"]
    del spec["lcrec"]                  # no LC-Rec section: a bundle without the part
    assert "lcrec" not in pipeline.build_sections(spec, PipelineConfig(), pipeline.STAGES, None)["export"]


def test_decode_section_is_a_second_finetune_run_that_export_carries(monkeypatch, tmp_path):
    if not (data_root() / SOURCES["gift-cards"][1]).is_dir():
        pytest.skip("shared data not found")
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    spec = {"dataset": "gift-cards", "finetune": {"run_name": "demo", "max_steps": 80},
            "decode": {"prompt_format": "alpaca", "max_steps": 360}, "export": {}}
    sections = pipeline.build_sections(spec, PipelineConfig(), pipeline.STAGES, None)
    assert sections["decode"]["run_name"] == "decode" and sections["decode"]["max_steps"] == 360
    assert sections["export"]["decode"] == "decode" and sections["export"]["run_name"] == "demo"
    spec["decode"]["run_name"] = "demo"    # would overwrite the ranker's run
    with pytest.raises(PipelineError, match="its own"):
        pipeline.build_sections(spec, PipelineConfig(), pipeline.STAGES, None)
    del spec["decode"]
    assert "decode" not in pipeline.build_sections(spec, PipelineConfig(), pipeline.STAGES, None)["export"]


def test_refine_section_continues_the_finetune_run_and_is_what_evaluate_and_export_take(
        monkeypatch, tmp_path):
    if not (data_root() / SOURCES["gift-cards"][1]).is_dir():
        pytest.skip("shared data not found")
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    spec = {"dataset": "gift-cards",
            "finetune": {"run_name": "six", "max_steps": 80, "max_history": 10, "output_dir": "x"},
            "refine": {"tasks": ["next_item"], "task_ratio": [1], "max_steps": 30},
            "evaluate": {"runs": ["six-refine"]}, "export": {}}
    sections = pipeline.build_sections(spec, PipelineConfig(), pipeline.STAGES, None)
    refine = sections["refine"]
    assert refine["run_name"] == "six-refine" and refine["max_steps"] == 30
    assert refine["max_history"] == 10 and "output_dir" not in refine   # its own folder
    assert refine["init_from"] == str(Path("x") / "best")               # the finetune run's best
    assert sections["evaluate"]["max_history"] == 10
    assert sections["export"]["run_name"] == "six-refine"
    names = [s.name for s in pipeline.STAGES]
    assert names.index("finetune") < names.index("refine") < names.index("evaluate")
    spec["refine"]["run_name"] = "six"     # would overwrite the run it starts from
    with pytest.raises(PipelineError, match="its own"):
        pipeline.build_sections(spec, PipelineConfig(), pipeline.STAGES, None)
    del spec["finetune"]
    with pytest.raises(PipelineError, match="finetune section"):
        pipeline.build_sections(spec, PipelineConfig(), pipeline.STAGES, None)


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_pipeline_yaml_in_configs_builds(path, monkeypatch, tmp_path):
    """A checked-in pipeline YAML whose keys no longer fit its stages fails here, not an hour
    into a run."""
    from ulmrec.config import load_yaml
    spec = load_yaml(path)
    names = {s.name for s in pipeline.STAGES}
    if not names & set(spec):
        pytest.skip("a single stage's config, not a pipeline")
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    sections = pipeline.build_sections(spec, PipelineConfig(), pipeline.STAGES, path)
    if path.name == "cpu-best.yaml":   # the ranker the games demo bundles
        ft = sections["finetune"]
        assert ft["scorer"] == "lines" and ft["residual"] and ft["train_candidates"] == "validation"
        assert ft["index_kind"] == "pid" and ft["index_run"] == "index-served"
        assert sections["export"]["run_name"] == ft["run_name"] == "lines-val-pid"
        assert sections["evaluate"]["runs"] == ["lines-val-pid"]
        assert sections["export"]["decode"] == "decode-pid-3k"


def test_run_help_names_the_command_and_the_from_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m train run ")
    assert "--from STAGE" in out and "--from-stage" not in out and "__main__" not in out
    with pytest.raises(SystemExit):
        cli.main(["data", "--help"])
    assert capsys.readouterr().out.startswith("usage: python -m train data ")


@pytest.mark.parametrize("command", [["run"], ["data"], ["retrieve"]])
def test_missing_or_broken_config_yaml_is_one_line_and_exit_2(tmp_path, capsys, command):
    broken = tmp_path / "broken.yaml"
    broken.write_text("dataset: gift-cards\ndata: {min_core: 3\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- gift-cards\n")
    for path, why in ((tmp_path / "x.yaml", "config file not found"),
                      (broken, "not valid YAML"), (listed, "expected a mapping"),
                      (tmp_path, "a folder, not a config file")):
        with pytest.raises(SystemExit) as e:
            cli.main(command + ["--config", str(path)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}") and why in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        cli.main(command + ["--config", str(broken)])
    assert f"{broken}:3:1: not valid YAML" in capsys.readouterr().err   # where YAML noticed


def test_config_errors_from_the_shell(tmp_path):
    """As a user types it: prog name and one-line errors survive `python -m`."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "train", "run", "--config", str(tmp_path / "x.yaml")],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr == f"error: {tmp_path / 'x.yaml'}: config file not found\n"
    out = subprocess.run([sys.executable, "-m", "train.data", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m train.data ")
    assert "--allow-truncated" in out.stdout
