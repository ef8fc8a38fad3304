"""Training loop of the language-model example: one model per recipe, same seed, data order and
hyper-parameters; jitted train step with the state donated; periodic validation; optional orbax
checkpoints and resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

import qjax

from lm import data as D
from lm import sharding as S
from lm import variants
from lm.model import FLAX, Decoder, ModelConfig

OPTIMIZER_STATES = ("none", "int8", "fp8", "int4")
WEIGHTS = ("fp32", "bf16_sr", "bf16_kahan")
# Dense bf16 tensor-core peak of one GPU, FLOP/s (vendor data sheets, SXM parts), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H100 PCIE": 756e12, "H200": 989e12, "H800": 989e12,
                   "GH200": 989e12, "A100": 312e12, "B200": 2250e12, "B300": 2250e12}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run of one recipe depends on, besides the recipe itself.

    Attributes:
      model: the decoder's shape and numerics (its ``recipe`` is replaced per run).
      steps: optimizer steps.
      batch_size, seq_len: sequences per step and tokens per sequence.
      lr: peak learning rate (linear warmup over ``warmup_steps``, cosine decay to
        ``lr * final_lr_ratio``).
      warmup_steps, final_lr_ratio: the schedule.
      weight_decay, b1, b2, clip_norm: AdamW (no decay on norm scales) and gradient clipping.
      optimizer_state: ``"none"`` (float32 moments) or a ``qjax.optim`` state format.
      weights: ``"fp32"`` parameters, or bf16 parameters updated with stochastic rounding
        (``"bf16_sr"``) or Kahan summation (``"bf16_kahan"``), via ``qjax.optim.adamw``.
      seed: parameters, data order and quantization randomness.
      eval_every, eval_batches: validation period (steps; 0: only at the start and end) and size.
      log_every: steps between progress updates (the host waits for the device only then).
      checkpoint_every: steps between orbax checkpoints (0: none).
    """

    model: ModelConfig
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    optimizer_state: str = "none"
    weights: str = "fp32"
    seed: int = 0
    eval_every: int = 0
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 0

    def __post_init__(self):
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"unknown optimizer state {self.optimizer_state!r}; valid: "
                             f"{', '.join(OPTIMIZER_STATES)}.")
        if self.weights not in WEIGHTS:
            raise ValueError(f"unknown weights {self.weights!r}; valid: {', '.join(WEIGHTS)}.")
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@flax.struct.dataclass
class TrainState:
    step: Int[Array, ""]
    params: Any
    opt_state: Any


@dataclasses.dataclass
class History:
    """What a run of one recipe measured (JSON-serialisable; saved with each checkpoint)."""

    recipe: str
    planned_steps: int
    train_steps: list[int] = dataclasses.field(default_factory=list)
    train_loss: list[float] = dataclasses.field(default_factory=list)
    val_steps: list[int] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    timed_steps: int = 0
    timed_seconds: float = 0.0
    compile_seconds: float = 0.0
    diverged_at: int | None = None

    @property
    def finished(self) -> bool:
        return self.diverged_at is not None or (bool(self.train_steps)
                                                and self.train_steps[-1] >= self.planned_steps)

    @property
    def seconds_per_step(self) -> float:
        return self.timed_seconds / self.timed_steps if self.timed_steps else math.nan

    @classmethod
    def from_json(cls, value: dict) -> "History":
        return cls(**value)


def cross_entropy(logits: Float[Array, "b t v"], targets: Int[Array, "b t"]) -> Float[Array, ""]:
    """Mean next-token cross-entropy (nats) over the real vocabulary, in float32; the padded
    logits beyond ``data.VOCAB`` are dropped."""
    logits = logits[..., :D.VOCAB].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Gradient clipping, then ``qjax.optim.adamw`` (optax's AdamW when both low-precision options
    are off) on a warmup + cosine schedule; norm scales (1-D parameters) are not decayed."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, min(config.warmup_steps, config.steps - 1), config.steps,
        config.lr * config.final_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    state_fmt = None if config.optimizer_state == "none" else config.optimizer_state
    weights = None if config.weights == "fp32" else config.weights
    adamw = qjax.optim.adamw(schedule, b1=config.b1, b2=config.b2, eps=1e-8,
                             weight_decay=config.weight_decay, mask=decay_mask,
                             state_fmt=state_fmt, params=weights, seed=config.seed)
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)


def init_state(model: Decoder, optimizer: optax.GradientTransformation, config: TrainConfig,
               ) -> TrainState:
    """Parameters from ``config.seed`` (the same for every recipe: recipes add no parameters)."""
    tokens = jnp.zeros((config.batch_size, config.seq_len), jnp.int32)
    params = model.init({"params": jax.random.key(config.seed)}, tokens)["params"]
    if config.weights != "fp32":
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_steps(model: Decoder, optimizer: optax.GradientTransformation, config: TrainConfig,
               plan: S.MeshPlan | None = None, state_shardings: Any = None):
    """The jitted train step (state donated) and validation loss function; with a mesh ``plan``,
    jitted with the state's ``state_shardings`` and the plan's batch sharding.

    The ``"quant"`` RNG stream of step ``s`` is ``fold_in(key(seed + 1), s)``: stochastic
    recipes get fresh randomness every step, reproducibly and without keeping a key in the state.
    Validation uses the fixed key ``key(seed + 2)``.
    """
    base_key = jax.random.key(config.seed + 1)
    eval_key = jax.random.key(config.seed + 2)
    mesh_context = (contextlib.nullcontext if plan is None
                    else lambda: jax.sharding.use_abstract_mesh(plan.mesh.abstract_mesh))

    def loss_fn(params, tokens, key):
        logits = model.apply({"params": params}, tokens[:, :-1], rngs={"quant": key})
        return cross_entropy(logits, tokens[:, 1:])

    def train_step(state: TrainState, tokens):
        key = jax.random.fold_in(base_key, state.step)
        with mesh_context():  # lets the model's sharding hints name the mesh axes
            loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), loss

    def eval_loss(params, tokens):
        return loss_fn(params, tokens, eval_key)

    if plan is None:
        return jax.jit(train_step, donate_argnums=0), jax.jit(eval_loss)
    return (jax.jit(train_step, donate_argnums=0, in_shardings=(state_shardings, plan.batch),
                    out_shardings=(state_shardings, plan.replicated)),
            jax.jit(eval_loss, in_shardings=(state_shardings.params, plan.batch),
                    out_shardings=plan.replicated))


class Checkpointer:
    """Orbax checkpoints of one recipe's run under ``directory``: the train state plus the
    history and config as JSON. orbax is imported only when a checkpoint is used."""

    def __init__(self, directory: pathlib.Path, every: int):
        try:
            import orbax.checkpoint as ocp
        except ImportError as error:
            raise ImportError("--checkpoint-every / --resume need orbax-checkpoint: "
                              "pip install orbax-checkpoint") from error
        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        self.every = every
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, history: History, config: TrainConfig):
        args = self._ocp.args
        self.manager.save(step, args=args.Composite(
            state=args.StandardSave(state),
            meta=args.JsonSave({"history": dataclasses.asdict(history),
                                "config": config_fingerprint(config)})), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: TrainState, config: TrainConfig,
                ) -> tuple[TrainState, History]:
        args = self._ocp.args
        restored = self.manager.restore(step, args=args.Composite(
            state=args.StandardRestore(abstract_state), meta=args.JsonRestore()))
        saved = restored["meta"]["config"]
        if saved != config_fingerprint(config):
            raise ValueError(f"--resume: the checkpoint in {self.manager.directory} was written "
                             f"with a different configuration:\n  saved: {saved}\n  now:   "
                             f"{config_fingerprint(config)}\nuse the same flags or another --out.")
        return restored["state"], History.from_json(restored["meta"]["history"])

    def close(self):
        self.manager.close()


def config_fingerprint(config: TrainConfig) -> str:
    """The configuration a checkpoint must match to be resumed (everything but the period of
    logging, validation and checkpointing)."""
    fields = dataclasses.asdict(config)
    for name in ("log_every", "checkpoint_every", "eval_every", "eval_batches"):
        fields.pop(name)
    return json.dumps(fields, sort_keys=True)


def save_history(directory: pathlib.Path, history: History, config: TrainConfig) -> None:
    """Writes ``directory/<recipe>.json``: the history and the configuration it belongs to."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"config": config_fingerprint(config), "history": dataclasses.asdict(history)}
    (directory / f"{history.recipe}.json").write_text(json.dumps(payload))


def load_histories(directory: pathlib.Path, config: TrainConfig) -> dict[str, History]:
    """The histories saved in ``directory`` by runs with the same configuration (others are
    skipped), by recipe."""
    found = {}
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        payload = json.loads(path.read_text())
        if payload.get("config") == config_fingerprint(config):
            history = History.from_json(payload["history"])
            found[history.recipe] = history
    return found


def peak_flops(device: jax.Device) -> float | None:
    """The bf16 dense peak of ``device`` if it is a GPU this table knows, else None."""
    if device.platform != "gpu":
        return None
    kind = device.device_kind.upper()
    matches = [name for name in PEAK_BF16_FLOPS if name in kind]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


class Progress:
    """tqdm when installed, else a plain line every ``print_every`` steps."""

    def __init__(self, recipe: str, total: int, initial: int, print_every: int,
                 enabled: bool = True):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        tqdm = tqdm if enabled else None
        self.enabled = enabled
        self.recipe, self.total, self.print_every = recipe, total, print_every
        self.bar = (tqdm(total=total, initial=initial, desc=recipe, unit="step", dynamic_ncols=True)
                    if tqdm else None)
        self.last_step = initial

    def update(self, step: int, loss: float, tokens_per_second: float, val_loss: float | None):
        speed = "-" if math.isnan(tokens_per_second) else f"{tokens_per_second:,.0f}"
        fields = {"loss": f"{loss:.4f}", "tok/s": speed}
        if val_loss is not None:
            fields["val"] = f"{val_loss:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(step - self.last_step)
        elif self.enabled and (step % self.print_every == 0 or step == self.total):
            print(f"[{self.recipe}] step {step}/{self.total} "
                  + " ".join(f"{k} {v}" for k, v in fields.items()), flush=True)
        self.last_step = step

    def close(self):
        if self.bar is not None:
            self.bar.close()


def validation_loss(eval_loss, params, batches: np.ndarray) -> float:
    return float(np.mean([float(eval_loss(params, jnp.asarray(b))) for b in batches]))


def train_recipe(recipe: str, config: TrainConfig, corpus: D.Corpus, *,
                 checkpoint_dir: pathlib.Path | None = None, resume: bool = False,
                 verbose: bool = True, mesh: str | None = None) -> History:
    """Trains one model with ``recipe`` and returns its :class:`History`.

    Args:
      recipe: a name from ``qjax.recipes.names()`` (or ``"flax"``: plain Flax layers).
      config: the run's configuration.
      corpus: the data.
      checkpoint_dir: where this recipe's checkpoints go (needed for checkpoints and resume).
      resume: continue from the latest checkpoint in ``checkpoint_dir`` if there is one.
      verbose: print progress.
      mesh: ``"data=N,fsdp=M,tensor=K"`` to train sharded over that many devices
        (:mod:`lm.sharding`); None: one device.

    Returns:
      The run's history: per-step training loss, validation losses, timings.

    Example:
      >>> history = train_recipe("bf16", config, load_corpus())
      >>> history.val_loss[-1] < history.val_loss[0]
      True
    """
    model_config = dataclasses.replace(config.model, recipe=recipe,
                                       head_recipe="flax" if recipe == "flax" else
                                       config.model.head_recipe)
    model = Decoder(model_config)
    optimizer = make_optimizer(config)
    plan = state_shardings = None
    if mesh:
        plan = S.make_plan(S.parse_mesh(mesh))
        S.check_batch(plan, config.batch_size)
        abstract = jax.eval_shape(lambda: init_state(model, optimizer, config))
        if recipe != FLAX:
            S.check_divisibility(abstract.params, plan.sizes, variants.resolve(recipe),
                                 config.tokens_per_step)
        state_shardings = plan.shardings(abstract)
    train_step, eval_loss = make_steps(model, optimizer, config, plan, state_shardings)
    val_batches = D.validation_batches(corpus, num_batches=config.eval_batches,
                                       batch_size=config.batch_size, seq_len=config.seq_len)
    batch = lambda step: D.train_batch(corpus, step, batch_size=config.batch_size,  # noqa: E731
                                       seq_len=config.seq_len, seed=config.seed)

    checkpointer = None
    if checkpoint_dir is not None and (resume or config.checkpoint_every):
        checkpointer = Checkpointer(checkpoint_dir, config.checkpoint_every)
    history = History(recipe, config.steps)
    if checkpointer is not None and resume and checkpointer.latest_step() is not None:
        abstract = jax.eval_shape(lambda: init_state(model, optimizer, config))
        state, history = checkpointer.restore(checkpointer.latest_step(), abstract, config)
        if plan is not None:
            state = jax.device_put(state, state_shardings)
        if verbose:
            print(f"[{recipe}] resumed from step {int(state.step)} ({checkpoint_dir})")
    elif plan is not None:
        state = jax.jit(lambda: init_state(model, optimizer, config),
                        out_shardings=state_shardings)()
    else:
        state = init_state(model, optimizer, config)
    start = int(state.step)
    if start == 0:
        history.val_steps.append(0)
        history.val_loss.append(validation_loss(eval_loss, state.params, val_batches))

    if start >= config.steps or history.diverged_at is not None:
        if checkpointer is not None:
            checkpointer.close()
        return history
    put = (lambda b: jnp.asarray(b)) if plan is None else (  # noqa: E731
        lambda b: jax.device_put(b, plan.batch))
    tokens = put(batch(start))
    began = time.perf_counter()
    compiled = train_step.lower(state, tokens).compile()
    history.compile_seconds += time.perf_counter() - began

    progress = Progress(recipe, config.steps, start, max(config.log_every, config.steps // 20),
                        enabled=verbose)
    pending: list[tuple[int, Array]] = []
    timer_start, timed_from = None, None
    for step in range(start, config.steps):
        state, loss = compiled(state, tokens)
        pending.append((step + 1, loss))
        done = step + 1
        if done < config.steps:
            tokens = put(batch(done))  # built on the host while the device computes
        evaluate = done == config.steps or (config.eval_every and done % config.eval_every == 0)
        checkpoint = checkpointer is not None and config.checkpoint_every and (
            done % config.checkpoint_every == 0 or done == config.steps)
        if not (done % config.log_every == 0 or evaluate or checkpoint or done == start + 1):
            continue
        losses = [float(value) for _, value in pending]  # waits for the device
        now = time.perf_counter()
        if timer_start is None:  # the clock starts after the first step (warm-up)
            timer_start, timed_from = now, done
        else:
            history.timed_steps += done - timed_from
            history.timed_seconds += now - timer_start
            timer_start, timed_from = now, done
        history.train_steps += [s for s, _ in pending]
        history.train_loss += losses
        pending = []
        val = None
        if evaluate:
            val = validation_loss(eval_loss, state.params, val_batches)
            history.val_steps.append(done)
            history.val_loss.append(val)
        tokens_per_second = config.tokens_per_step / history.seconds_per_step \
            if history.timed_steps else math.nan
        progress.update(done, float(np.mean(losses)), tokens_per_second, val)
        if not all(math.isfinite(x) for x in losses):
            history.diverged_at = done
            if verbose:
                print(f"[{recipe}] loss is not finite at step {done}: stopping this recipe.")
            break
        if checkpoint:
            checkpointer.save(done, state, history, config)
        timer_start = time.perf_counter()  # validation and checkpoints are not timed
    progress.close()
    if checkpointer is not None:
        checkpointer.close()
    return history
