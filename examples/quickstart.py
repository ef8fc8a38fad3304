"""A Flax MLP trained in MXFP4 (the change: nn.Dense(n) -> qjax.dense(n, fmt="mxfp4")) to predict
the next byte of real text, the json decoder's source, from the previous 8 bytes."""
import inspect, json.decoder
import flax.linen as nn, jax, numpy as np, optax, qjax

text = np.frombuffer(inspect.getsource(json.decoder).encode(), np.uint8)
windows = np.lib.stride_tricks.sliding_window_view(text, 9)[:2048]  # 9 bytes: 8 in, 1 out
inputs, targets = jax.nn.one_hot(windows[:, :8], 256).reshape(-1, 8 * 256), windows[:, 8]

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(qjax.dense(256, fmt="mxfp4")(x))  # was: nn.Dense(256)(x)
        return qjax.dense(256, fmt="mxfp4")(x)        # was: nn.Dense(256)(x)

model, optimizer = MLP(), optax.adam(3e-3)
params = model.init(jax.random.key(0), inputs[:64])
opt_state = optimizer.init(params)
loss_fn = lambda p, key: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
    model.apply(p, inputs, rngs={"quant": key}), targets).mean()  # "quant": SR, random Hadamard
@jax.jit
def step(params, opt_state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, key)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

for i in range(61):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    if i % 20 == 0:
        print(f"step {i:3d}  loss {loss:.3f} nats/byte")
