"""The examples: the language-model main job (train_lm.py and its lm/ package), the quickstart."""

import csv
import dataclasses
import hashlib
import importlib.util
import pathlib
import runpy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load_train_lm():
    spec = importlib.util.spec_from_file_location("train_lm", EXAMPLES / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_lm"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # puts examples/ on sys.path, so `lm` imports
    return module


train_lm = _load_train_lm()
from lm import data as D  # noqa: E402
from lm import model as M  # noqa: E402
from lm import report  # noqa: E402
from lm import train as T  # noqa: E402
from lm import variants as V  # noqa: E402

FAST = ["--preset", "tiny", "--batch-size", "8", "--seq-len", "64", "--warmup-steps", "4",
        "--eval-batches", "2", "--eval-every", "0", "--log-every", "4"]


def _curves(path: pathlib.Path) -> dict:
    out = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            out.setdefault((row["recipe"], row["split"]), []).append(
                (int(row["step"]), float(row["loss"])))
    return out


# --------------------------------------------------------------------------- the main job


def test_train_lm_two_recipes_write_table_and_loss_decreases(tmp_path):
    # --parallel: each recipe in its own process, then one combined table
    rows = train_lm.main([*FAST, "--steps", "16", "--recipes", "bf16,mxfp8", "--parallel", "2",
                          "--out", str(tmp_path)])
    assert [r.recipe for r in rows] == ["bf16", "mxfp8"]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["bf16.log", "mxfp8.log"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| bf16 |" in markdown and "| mxfp8 |" in markdown
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["recipe"] for r in table] == ["bf16", "mxfp8"]
    assert float(table[0]["gap to bf16 %"]) == 0.0
    assert all(float(r["tokens/s"]) > 0 and r["status"] == "ok" for r in table)
    assert (tmp_path / "loss.png").exists() == report.can_plot()
    curves = _curves(tmp_path / "curves.csv")
    for recipe in ("bf16", "mxfp8"):
        val = curves[(recipe, "val")]
        assert [s for s, _ in val] == [0, 16]
        assert val[-1][1] < val[0][1] - 0.5, val  # from ~ln(257) = 5.55 down by at least 0.5
        train = [v for _, v in curves[(recipe, "train")]]
        assert len(train) == 16 and np.mean(train[-4:]) < np.mean(train[:4])
    # same data, same initial parameters: the first step's loss differs only by quantization
    first = [curves[(r, "train")][0][1] for r in ("bf16", "mxfp8")]
    assert abs(first[0] - first[1]) < 0.02
    # a later run into the same --out keeps finished recipes (--resume) and the earlier rows
    again = train_lm.main([*FAST, "--steps", "16", "--recipes", "bf16,mxfp8", "--resume",
                           "--out", str(tmp_path)])
    assert [(r.recipe, r.val_loss) for r in again] == [(r.recipe, r.val_loss) for r in rows]
    # in this process (no --parallel), the same numbers as the worker's
    alone = train_lm.main([*FAST, "--steps", "16", "--recipes", "mxfp8",
                           "--out", str(tmp_path / "in_process")])
    assert [(r.recipe, r.val_loss) for r in alone] == [(r.recipe, r.val_loss) for r in rows[1:]]


def test_parallel_workers_that_fail_are_named(tmp_path):
    with pytest.raises(RuntimeError, match="recipes bf16 failed; see their logs"):
        train_lm.train_in_parallel(["bf16"], ["--no-such-flag"], tmp_path, workers=1, gpus=0)
    assert "unrecognized arguments: --no-such-flag" in (tmp_path / "logs" / "bf16.log").read_text()


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, monkeypatch):
    pytest.importorskip("orbax.checkpoint")
    model = M.ModelConfig(D.VOCAB_PADDED, 64, 1, 2, 128, dtype="float32")
    config = T.TrainConfig(model, steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2,
                           weights="bf16_sr", eval_batches=1, log_every=1,
                           checkpoint_every=3)
    corpus = D.load_corpus()
    run = lambda name, **kw: T.train_recipe("bf16", config, corpus,  # noqa: E731
                                            checkpoint_dir=tmp_path / name, verbose=False, **kw)
    straight = run("straight")

    class Stop(Exception):
        pass

    save = T.Checkpointer.save

    def save_then_stop(self, step, *args):
        save(self, step, *args)
        raise Stop(step)

    monkeypatch.setattr(T.Checkpointer, "save", save_then_stop)
    with pytest.raises(Stop):
        run("cut")
    monkeypatch.setattr(T.Checkpointer, "save", save)
    resumed = run("cut", resume=True)
    assert resumed.train_steps == straight.train_steps == list(range(1, 7))
    assert resumed.train_loss == straight.train_loss  # same program, same state: bit-exact
    assert resumed.val_loss == straight.val_loss
    with pytest.raises(ValueError, match="different configuration"):
        T.train_recipe("bf16", dataclasses.replace(config, lr=1e-3), corpus,
                       checkpoint_dir=tmp_path / "cut", resume=True, verbose=False)


def test_unknown_recipe_lists_the_valid_names():
    with pytest.raises(SystemExit, match="unknown recipe.*nvfp4"):
        train_lm.parse_recipes("bf16,mxfp5")
    assert train_lm.parse_recipes("all") == list(train_lm.qjax.recipes.names())
    assert train_lm.parse_recipes("flax,variants")[1:] == list(V.VARIANTS)
    with pytest.raises(ValueError, match="unknown recipe"):
        M.ModelConfig(D.VOCAB_PADDED, 64, 1, 2, 128, recipe="mxfp5")


def _differences(a, b) -> set[str]:
    """The GEMM fields in which two recipes differ, as "gemm.field"."""
    out = set()
    for gemm in ("forward", "dgrad", "wgrad"):
        x, y = getattr(a, gemm), getattr(b, gemm)
        out |= {f"{gemm}.{f.name}" for f in dataclasses.fields(x)
                if getattr(x, f.name) != getattr(y, f.name)}
    return out


def test_variants_change_only_what_they_say():
    recipes = train_lm.qjax.recipes
    v = V.VARIANTS
    assert _differences(v["mxfp4_all_wgrad_dht"], v["mxfp4_all_rtn"]) == {
        "wgrad.transform"} and v["mxfp4_all_wgrad_dht"].wgrad.transform == "hadamard"
    assert _differences(v["mxfp4_all_wgrad_rht"], v["mxfp4_all_rtn"]) == {"wgrad.transform"}
    assert _differences(v["mxfp4_all_wgrad_sr"], v["mxfp4_all_rtn"]) == {"wgrad.lhs",
                                                                         "wgrad.rhs"}
    assert _differences(v["mxfp4_fprop_dgrad"], v["mxfp4_all_rtn"]) == {
        "wgrad.lhs", "wgrad.rhs"} and not v["mxfp4_fprop_dgrad"].wgrad.quantizes
    assert _differences(v["mxfp4_dht"], recipes.get("mxfp4")) == {"dgrad.transform",
                                                                  "wgrad.transform"}
    assert _differences(v["nvfp4_dht"], recipes.get("nvfp4")) == {"wgrad.transform"}
    assert _differences(v["nvfp4_wgrad_rtn"], recipes.get("nvfp4")) == {"wgrad.rhs"}
    assert v["nvfp4_wgrad_rtn"].wgrad.rhs.rounding == "nearest"
    assert all(name == r.name and name not in recipes.names() for name, r in v.items())


def test_getting_started_shows_the_quickstart_file():
    doc = (EXAMPLES.parent / "docs" / "getting_started.md").read_text()
    code = (EXAMPLES / "quickstart.py").read_text()
    assert f"```python\n{code}```" in doc


def test_presets_have_the_documented_sizes():
    sizes = {}
    for name, p in train_lm.PRESETS.items():
        config = M.ModelConfig(D.VOCAB_PADDED, p.d_model, p.num_layers, p.num_heads, p.mlp_hidden)
        sizes[name] = config.matmul_params() / 1e6
    assert 0.8 < sizes["tiny"] < 1.5 and 18 < sizes["small"] < 30
    assert 75 < sizes["base"] < 95 and 180 < sizes["large"] < 230


# --------------------------------------------------------------------------- model


def _tiny(**kw) -> M.ModelConfig:
    return M.ModelConfig(D.VOCAB_PADDED, 64, 1, 2, 128, dtype="float32", **kw)


def test_bf16_recipe_model_equals_the_plain_flax_twin():
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, D.VOCAB)
    qjax_model, flax_model = (M.Decoder(_tiny(recipe=r, head_recipe=r)) for r in ("bf16", "flax"))
    params = flax_model.init(jax.random.key(0), tokens)
    assert jax.tree.structure(qjax_model.init(jax.random.key(0), tokens)) == \
        jax.tree.structure(params)
    np.testing.assert_array_equal(qjax_model.apply(params, tokens),
                                  flax_model.apply(params, tokens))


@pytest.mark.parametrize("recipe", ["mxfp8", "mxfp4_all_rtn"])
def test_scanned_blocks_compute_the_unrolled_model(recipe):
    # The same parameters stacked along a layer axis give the same logits and gradients (recipes
    # that round to nearest: stochastic ones draw per-layer keys differently in the two forms).
    tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, D.VOCAB)
    config = M.ModelConfig(D.VOCAB_PADDED, 64, 2, 2, 128, recipe=recipe, dtype="float32")
    unrolled = M.Decoder(config)
    scanned = M.Decoder(dataclasses.replace(config, scan_layers=True))
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    params = unrolled.init(jax.random.key(0), tokens)["params"]
    blocks = [params.pop(f"block_{i}") for i in range(2)]
    stacked = dict(params, blocks={"block": stack(blocks)})
    assert jax.tree.structure(scanned.init(jax.random.key(0), tokens)["params"]) == \
        jax.tree.structure(stacked)

    def loss(model, p):
        logits = model.apply({"params": p}, tokens)
        return jnp.mean(logits.astype(jnp.float32) ** 2), logits

    (_, logits), grads = jax.value_and_grad(lambda p: loss(unrolled, p), has_aux=True)(params | {
        f"block_{i}": b for i, b in enumerate(blocks)})
    (_, scanned_logits), scanned_grads = jax.value_and_grad(
        lambda p: loss(scanned, p), has_aux=True)(stacked)
    np.testing.assert_array_equal(scanned_logits, logits)
    grads_stacked = stack([grads[f"block_{i}"] for i in range(2)])
    for a, b in zip(jax.tree.leaves(scanned_grads["blocks"]["block"]),
                    jax.tree.leaves(grads_stacked)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lookup_is_the_embedding_gather_and_its_gradient_the_exact_row_sums(dtype):
    import flax.linen as nn

    module = nn.Embed(D.VOCAB_PADDED, 16, dtype=dtype)
    tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, D.VOCAB)
    params = module.init(jax.random.key(0), tokens)
    cotangent = jax.random.normal(jax.random.key(2), (4, 64, 16), dtype)
    out, vjp = jax.vjp(lambda p: module.apply(p, tokens, method=M.lookup), params)
    np.testing.assert_array_equal(out, module.apply(params, tokens))
    grad = np.asarray(vjp(cotangent)[0]["params"]["embedding"], np.float64)
    # Exact row sums of the cotangent (float64), which the float32-accumulated matmul rounds once
    # (the scatter-add of nn.Embed's own gradient sums in the compute dtype: less accurate).
    g = np.asarray(cotangent, np.float64).reshape(-1, 16)
    exact, magnitude = np.zeros((D.VOCAB_PADDED, 16)), np.zeros((D.VOCAB_PADDED, 16))
    np.add.at(exact, np.asarray(tokens).ravel(), g)
    np.add.at(magnitude, np.asarray(tokens).ravel(), np.abs(g))
    rounding = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-23
    assert np.all(np.abs(grad - exact) <= rounding * np.abs(exact) + 2.0**-20 * magnitude)
    assert np.any(grad != 0)


def test_quantized_attention_is_close_to_exact_attention():
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, D.VOCAB)
    exact, quantized = (M.Decoder(_tiny(recipe="mxfp8", attention=a)) for a in ("xla", "quantized"))
    params = exact.init(jax.random.key(0), tokens)
    y, yq = exact.apply(params, tokens), quantized.apply(params, tokens)
    assert y.shape == yq.shape == (2, 32, D.VOCAB_PADDED)
    assert 0 < float(jnp.linalg.norm(yq - y) / jnp.linalg.norm(y)) < 0.05


def test_rotary_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 32))
    tile = lambda v: jnp.tile(v, (1, 16, 1, 1))  # noqa: E731  the same vector at every position
    rq, rk = M.rotary(tile(q), 10000.0)[0, :, 0], M.rotary(tile(k), 10000.0)[0, :, 0]
    scores = rq @ rk.T
    np.testing.assert_allclose(scores[3, 1], scores[12, 10], rtol=1e-5)
    np.testing.assert_allclose(scores[5, 5], jnp.dot(q.ravel(), k.ravel()), rtol=1e-5)
    assert M.attention_implementation("auto", rq) == "xla"  # CPU


def test_causal_model_ignores_future_tokens():
    model = M.Decoder(_tiny(recipe="mxfp8"))
    tokens = jax.random.randint(jax.random.key(1), (1, 32), 0, D.VOCAB)
    params = model.init(jax.random.key(0), tokens)
    changed = tokens.at[0, 20:].set((tokens[0, 20:] + 1) % D.VOCAB)
    np.testing.assert_array_equal(model.apply(params, tokens)[0, :20],
                                  model.apply(params, changed)[0, :20])


# --------------------------------------------------------------------------- data


def test_default_corpus_split_is_the_documented_path_hash():
    corpus = D.load_corpus()
    files = D.list_files(D.stdlib_path(), (".py",))
    relative = [p.relative_to(D.stdlib_path()).as_posix() for p in files]
    held_out = [int(hashlib.sha256(r.encode()).hexdigest()[:8], 16) % 20 == 0 for r in relative]
    assert corpus.validation_files == sum(held_out) > 0
    assert corpus.train_files == len(files) - sum(held_out) > corpus.validation_files
    assert not any("site-packages" in r for r in relative)
    first_train = next(p for p, v in zip(files, held_out) if not v).read_bytes()
    np.testing.assert_array_equal(corpus.train[:len(first_train)],
                                  np.frombuffer(first_train, np.uint8))
    assert corpus.train[len(first_train)] == D.EOS


def test_folder_corpus_and_batches_depend_only_on_seed_and_step(tmp_path):
    names = [f"doc{i}.txt" for i in range(100)]
    val_name = next(n for n in names if D.is_validation(n))
    train_name = next(n for n in names if not D.is_validation(n))
    (tmp_path / train_name).write_text("training text " * 20)
    (tmp_path / val_name).write_text("validation text " * 20)
    (tmp_path / ".hidden").write_text("never read")
    corpus = D.load_corpus(str(tmp_path))
    np.testing.assert_array_equal(corpus.train, np.append(
        np.frombuffer(b"training text " * 20, np.uint8), D.EOS))
    np.testing.assert_array_equal(corpus.validation, np.append(
        np.frombuffer(b"validation text " * 20, np.uint8), D.EOS))
    one = D.train_batch(corpus, 5, batch_size=4, seq_len=16, seed=0)
    np.testing.assert_array_equal(one, D.train_batch(corpus, 5, batch_size=4, seq_len=16, seed=0))
    assert not np.array_equal(one, D.train_batch(corpus, 6, batch_size=4, seq_len=16, seed=0))
    assert one.shape == (4, 17) and one.dtype == np.int32
    text = corpus.train.tobytes()
    assert all(row.astype(np.uint16).tobytes() in text for row in one)  # real windows


def test_single_file_splits_ninety_ten(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(bytes(range(200)) * 5)
    corpus = D.load_corpus(str(path))
    assert corpus.train.size == 900 + 1 and corpus.validation.size == 100 + 1
    np.testing.assert_array_equal(corpus.validation[:-1], np.frombuffer(
        path.read_bytes()[900:], np.uint8))
    with pytest.raises(ValueError, match="fewer than one window"):
        D.validation_batches(corpus, num_batches=1, batch_size=1, seq_len=200)
    with pytest.raises(FileNotFoundError, match="no such file"):
        D.load_corpus(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- quickstart


def test_quickstart_trains(capsys):
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    losses = [float(line.split("loss")[1].split()[0])
              for line in capsys.readouterr().out.splitlines() if "loss" in line]
    assert len(losses) >= 3 and losses[-1] < 0.6 * losses[0], losses
    assert len((EXAMPLES / "quickstart.py").read_text().splitlines()) <= 30
