"""The domain-adaptation benchmark's table (``--markdown``) from runs of
several processes: ``--recipe-only`` rows replace the recipe's rows of the
run of their pair and seed, the earlier recipe stays beside them, and a
pair whose seeds mix the two recipes is refused."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "domain_adaptation_bench",
        ROOT / "benchmarks" / "domain_adaptation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(seed, recipe, dann=0.60):
    acc = {"source only": 0.50, "source only + AdaBN": 0.55, "DANN": dann,
           "AdaMatch": recipe - 0.01, "AdaMatch + AdaBN": recipe,
           "target only": 0.95}
    pool = [k for k in acc if k != "target only"]
    return {"seed": seed, "acc": acc, "best_baseline": 0.55,
            "best_candidate": max(pool, key=acc.get),
            "chosen": "DANN", "ensv": {k: 0.5 for k in pool},
            "seconds": {"source only": 10.0, "AdaMatch": 50.0}}


def rerun(seed, recipe):
    return {"seed": seed, "recipe_only": True,
            "acc": {"AdaMatch": recipe - 0.02, "AdaMatch + AdaBN": recipe},
            "seconds": {"AdaMatch": 40.0}}


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text(json.dumps({"a:b": rows}))
    return str(path)


def test_recipe_only_rows_replace_the_recipe_and_keep_the_earlier(
        bench, tmp_path):
    runs = write(tmp_path, "runs.json", [run(0, 0.58), run(1, 0.62)])
    new = write(tmp_path, "new.json", [rerun(0, 0.80), rerun(1, 0.90)])
    merged = bench.load_runs([runs, new])["a:b"]
    assert [r["acc"]["AdaMatch + AdaBN"] for r in merged] == [0.80, 0.90]
    assert [r["earlier_recipe"] for r in merged] == [0.58, 0.62]
    # The pool's best is the new recipe now (it was DANN, 0.60).
    assert [r["best_candidate"] for r in merged] == ["AdaMatch + AdaBN"] * 2
    lines = bench.markdown([runs, new])
    assert "earlier recipe, same seeds" in lines[0]
    row = next(line for line in lines if line.startswith("| a -> b | 0.550"))
    # the recipe (mean 0.850), the earlier recipe (0.600), the oracle,
    # and 75% of the gap: (0.85 - 0.55) / (0.95 - 0.55)
    assert "| **0.850** | 0.600 | 0.950 | 75% |" in row
    # Selection scores were made with the earlier recipe in the pool: only
    # "the recipe itself" is counted.
    assert any("all runs: the recipe itself 2 of 2" in line
               for line in lines)


def test_a_pair_mixing_two_recipes_is_refused_unless_seeds_pick_one(
        bench, tmp_path):
    runs = write(tmp_path, "runs.json", [run(0, 0.58), run(1, 0.62)])
    new = write(tmp_path, "new.json", [rerun(0, 0.80)])
    with pytest.raises(SystemExit, match="--first-seed and --seeds"):
        bench.markdown([runs, new])
    lines = bench.markdown([runs, new], seeds=range(1))
    assert any("| **0.800** | 0.580 |" in line for line in lines)
    # Without the rerun the table is the earlier recipe's, with no extra
    # column; a seed below the best baseline is named.
    lines = bench.markdown([write(tmp_path, "low.json",
                                  [run(0, 0.54), run(1, 0.62)])])
    assert "earlier recipe" not in lines[0]
    assert any("a:b (1 of 2, at worst -1.0 points)" in line
               for line in lines)


def dumped(folder, name, acc, target, source=((0.9, 0.1), (0.2, 0.8))):
    """A --dump file of candidate ``name`` of pair a:b, seed 3: its
    accuracy, target probabilities and two labelled source images."""
    import numpy as np

    folder.mkdir(exist_ok=True)
    np.savez(folder / f"a-b-3-{name.replace(' ', '_')}.npz",
             pt=np.asarray(target, "float32"),
             ps=np.asarray(source, "float32"), ys=np.asarray([0, 1]),
             acc=acc, name=name)


def test_select_from_dump_scores_a_pool_with_a_rerun_recipe_in_it(
        bench, tmp_path):
    # Four target images. Three candidates agree on classes 0, 0, 1, 1;
    # the earlier recipe says 1, 1, 0, 0: EnsV picks one of the three (by
    # name on a tie: "DANN"), 10 points below the best, the recipe (0.7).
    sure = [(0.9, 0.1), (0.9, 0.1), (0.1, 0.9), (0.1, 0.9)]
    flipped = [row[::-1] for row in sure]
    earlier = tmp_path / "earlier"
    dumped(earlier, "source only", 0.50, sure)
    dumped(earlier, "DANN", 0.60, sure)
    dumped(earlier, "DANN + AdaBN", 0.55, sure)
    dumped(earlier, "AdaMatch + AdaBN", 0.70, flipped)
    lines = []
    found = bench.select_from_dump([str(earlier)],
                                   log=lines.append)["a:b:3"]
    assert found["picks"]["EnsV"] == "DANN"
    assert round(found["shortfall"]["EnsV"], 6) == 10.0
    assert found["shortfall"]["the recipe itself"] == 0.0
    assert lines[0].startswith("a:b, seed 3: 4 candidates, best 0.700")
    assert any(line.startswith(
        "EnsV: within 2 points of the pool's best on 0 of 1") for line in lines)
    # A --recipe-only --dump folder later in the list replaces the recipe:
    # it now agrees with the pool (all four tie; the first by name wins)
    # and is the best (0.8).
    rerun_folder = tmp_path / "rerun"
    dumped(rerun_folder, "AdaMatch + AdaBN", 0.80, sure,
           source=((0.99, 0.01), (0.01, 0.99)))
    found = bench.select_from_dump([str(earlier), str(rerun_folder)],
                                   log=lines.append)["a:b:3"]["shortfall"]
    assert round(found["EnsV"], 6) == 0.0
    assert any(line.startswith("a:b, seed 3: 4 candidates, best 0.800")
               for line in lines)
    # ATC: every candidate is right on both source images; the target
    # images are surer than the least sure of them for all but the rerun
    # recipe, whose source images are surer still: ATC predicts 1.0 for
    # the other three and picks the first by name, "DANN".
    assert round(found["ATC"], 6) == 20.0
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="No --dump files"):
        bench.select_from_dump([str(tmp_path / "empty")])


def test_recipe_only_takes_dump_and_peers_only_does_not(
        bench, tmp_path, monkeypatch):
    seen = []

    def run_pair(src, tgt, seed, args, log=print):
        seen.append((src, tgt, seed, args.recipe_only, args.dump))
        return {"acc": {}, "seconds": {}, "recipe_only": True}

    monkeypatch.setattr(bench, "run_pair", run_pair)
    bench.main(["--recipe-only", "--pairs", "a:b", "--seeds", "1",
                "--dump", str(tmp_path)])
    assert seen == [("a", "b", 0, True, str(tmp_path))]
    with pytest.raises(SystemExit):
        bench.main(["--peers-only", "--dump", str(tmp_path)])


def test_the_scale_check_is_scored_against_the_digit_heights(bench):
    # photo_digits draws its digits at 40 to 70% of the height, the other
    # domains at 60 to 100%.
    assert bench.expected_scale("syn_digits", "photo_digits") == "smaller"
    assert bench.expected_scale("photo_digits", "digits") == "larger"
    assert bench.expected_scale("digits", "digits_m") == "same"
