"""Per-example gradient norms for CLARS under Keras 3 (TensorFlow backend), inside ``model.fit``.

:func:`enable_clars` gives a model a train step that hands :class:`largebatch.keras.CLARS` the
sum over the batch of every layer's per-example gradient norm, Σ_i ‖∇_l f_i(w)‖, computed in
the same compiled train function. Two ways to the same numbers (as ``largebatch.torch``'s
``per_example_norm_sums``):

- ``hooks`` (models whose trainable variables all belong to ``Dense`` or ``Conv2D`` layers,
  each called once per step, no BatchNormalization in training mode): during the traced
  forward pass each such layer's input a and pre-activation output z are tapped (an identity
  with a custom gradient on z); Keras' own ``tape.gradient`` then delivers ∂L/∂z, from which the
  per-example weight-gradient norms follow without a per-example backward pass:
  Dense with 2-D input ‖g_i a_iᵀ‖ = ‖g_i‖·‖a_i‖; Dense with (B, ..., F) input and Conv2D
  (im2col as kh·kw shifted views of the input) ‖G_i·A_iᵀ‖, by L×L Gram matrices when the layer
  has few output positions L. Here g_i = B·∂L/∂z_i is the gradient of the example's own loss
  f_i (L is the batch-mean loss). No extra forward or backward pass: the cost is the norms.
- ``vmap`` (any model): ``tf.vectorized_map`` over each example's gradient, from
  ``model.stateless_call`` (BatchNorm uses each example's own statistics for this pass and its
  moving statistics are not touched); materialises every example's full gradient.

``"auto"`` picks ``hooks`` where it applies, else ``vmap``. The per-example loss f_i is what
Keras' train step differentiates, restricted to example i (the compiled loss; weight
regularisers do not depend on one example and are left out, as in torch's per-example loss).
Under a ``LossScaleOptimizer`` the tapped gradients are unscaled.

Across Horovod ranks the per-rank sums and batch sizes are added with one allreduce by
:func:`largebatch.keras.DistributedOptimizer` (with ``accumulation_steps=k``: summed over the k
micro-batches first), so the denominator is the mean over the global batch.
"""
import types

import keras
import tensorflow as tf

from ._checks import find_inner

__all__ = ["enable_clars", "per_example_norm_sums", "METHODS"]

METHODS = ("auto", "hooks", "vmap")


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method: expected 'auto', 'hooks' or 'vmap', got {method!r}")
    return method


def _sublayers(model):
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)]


def _own_trainable(layer):
    own = [v for v in getattr(layer, "_trainable_variables", [])]
    return own if layer.trainable else []


def hooks_unsupported(model):
    """Why the hook method cannot give this model's per-example gradients, or None."""
    owners = {}
    for layer in _sublayers(model):
        name = layer.name
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            return f"BatchNormalization {name!r} in training mode couples the examples"
        own = _own_trainable(layer)
        if not own:
            continue
        if type(layer) not in (keras.layers.Dense, keras.layers.Conv2D):
            return f"layer {name!r} ({type(layer).__name__}) is not Dense or Conv2D"
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return f"layer {name!r} uses LoRA or quantization"
        if isinstance(layer, keras.layers.Conv2D) and layer.groups != 1:
            return f"Conv2D {name!r} has groups={layer.groups}"
        for v in own:
            owners[id(v)] = layer
    missing = [v.path for v in model.trainable_variables if id(v) not in owners]
    if missing:
        return f"variable {missing[0]!r} does not belong to a Dense or Conv2D layer"
    return None


# --------------------------------------------------------------------------- the hook method

def _sq(x):
    """Per-example squared norm of (B, ...) in float32."""
    x = tf.cast(x, tf.float32)
    return tf.reduce_sum(tf.reshape(tf.square(x), (tf.shape(x)[0], -1)), axis=1)


def _product_norm_sq(g, a):
    """‖g_iᵀ a_i‖² for g (B, L, m), a (B, L, n): as the product's norm, or, when L² < m·n, as
    Σ (g_i g_iᵀ) ⊙ (a_i a_iᵀ) over L×L Gram matrices (same value, fewer operations)."""
    g, a = tf.cast(g, tf.float32), tf.cast(a, tf.float32)
    L, m, n = g.shape[1], g.shape[2], a.shape[2]
    if L is not None and m is not None and n is not None and L * L < m * n:
        return tf.reduce_sum(tf.matmul(g, g, transpose_b=True) * tf.matmul(a, a, transpose_b=True), axis=(1, 2))
    return _sq(tf.matmul(g, a, transpose_a=True))


def _conv_offsets(a, layer, out_h, out_w):
    """The kh·kw shifted views of the (padded) input that im2col would stack: each (B, H'·W', C_in),
    made with strided slices (``tf.image.extract_patches`` is ~10× slower on few channels)."""
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    if layer.padding == "same":                      # TensorFlow's SAME: the extra row/column after
        pads = []
        for size, out, k, st, d in ((a.shape[1], out_h, kh, sh, dh), (a.shape[2], out_w, kw, sw, dw)):
            total = max((out - 1) * st + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        a = tf.pad(a, [(0, 0), pads[0], pads[1], (0, 0)])
    batch, channels = tf.shape(a)[0], a.shape[-1]
    for y in range(kh):
        for x in range(kw):
            view = a[:, y * dh: y * dh + (out_h - 1) * sh + 1: sh, x * dw: x * dw + (out_w - 1) * sw + 1: sw, :]
            yield tf.reshape(view, (batch, out_h * out_w, channels))


def _conv_norm_sq(layer, a, g):
    """‖G_iᵀ·U_i‖² of a Conv2D with im2col U_i = [S_1 ... S_k] (the shifted views): the sum over
    views of ‖G_iᵀ S_o‖², or by Gram matrices Σ (G_i G_iᵀ) ⊙ Σ_o (S_o S_oᵀ) when L² < C_out·k·C_in."""
    if layer.data_format == "channels_first":
        a, g = tf.transpose(a, (0, 2, 3, 1)), tf.transpose(g, (0, 2, 3, 1))
    a, g = tf.cast(a, tf.float32), tf.cast(g, tf.float32)
    out_h, out_w, c_out = g.shape[1], g.shape[2], g.shape[3]
    batch, L = tf.shape(g)[0], out_h * out_w
    g3 = tf.reshape(g, (batch, L, c_out))
    views = _conv_offsets(a, layer, out_h, out_w)
    k = layer.kernel_size[0] * layer.kernel_size[1] * a.shape[-1]
    if L * L < c_out * k:
        gram = None
        for view in views:
            part = tf.matmul(view, view, transpose_b=True)
            gram = part if gram is None else gram + part
        weight_sq = tf.reduce_sum(tf.matmul(g3, g3, transpose_b=True) * gram, axis=(1, 2))
    else:
        weight_sq = tf.add_n([_sq(tf.matmul(g3, view, transpose_a=True)) for view in views])
    return weight_sq, _sq(tf.reduce_sum(g3, axis=1))


def _layer_norm_sq(layer, a, g):
    """(weight, bias) per-example squared gradient norms of one Dense/Conv2D layer from its input
    a and the gradient g of the example losses with respect to its pre-activation output."""
    if isinstance(layer, keras.layers.Conv2D):
        return _conv_norm_sq(layer, a, g)
    if a.shape.rank == 2:                                              # rank one: ‖g aᵀ‖ = ‖g‖‖a‖
        g_sq = _sq(g)
        return g_sq * _sq(a), g_sq
    batch = tf.shape(a)[0]
    positions = 1
    for d in a.shape[1:-1]:
        positions = None if (d is None or positions is None) else positions * d
    g3 = tf.ensure_shape(tf.reshape(g, (batch, -1, g.shape[-1])), (None, positions, g.shape[-1]))
    a3 = tf.ensure_shape(tf.reshape(a, (batch, -1, a.shape[-1])), (None, positions, a.shape[-1]))
    return _product_norm_sq(g3, a3), _sq(tf.reduce_sum(tf.cast(g3, tf.float32), axis=1))


class _Taps:
    """Trace-time record of the tapped layers of one train step: their per-example squared norms
    arrive when Keras' ``tape.gradient`` runs the taps' gradient functions."""

    def __init__(self, layers):
        self.layers = layers
        self.calls = {id(layer): 0 for layer in layers}
        self.norm_sq = {}              # id(variable) -> (B,) squared norms of the mean-loss gradient

    def install(self):
        for layer in self.layers:
            layer.call = types.MethodType(_tapped_call(self, type(layer).call), layer)

    def remove(self):
        for layer in self.layers:
            if "call" in layer.__dict__:
                del layer.__dict__["call"]

    def shared(self):
        return [layer.name for layer in self.layers if self.calls[id(layer)] > 1]

    def unreached(self):
        return [layer.name for layer in self.layers if self.calls[id(layer)] == 0]


def _tapped_call(taps, call):
    def tapped(layer, inputs, *args, **kwargs):
        taps.calls[id(layer)] += 1
        activation = layer.activation
        layer.activation = None
        try:
            z = call(layer, inputs, *args, **kwargs)
        finally:
            layer.activation = activation
        z = _tap(taps, layer, inputs, z)
        return activation(z) if activation is not None else z
    return tapped


def _tap(taps, layer, a, z):
    @tf.custom_gradient
    def identity(z):
        def grad(dz):
            weight_sq, bias_sq = _layer_norm_sq(layer, a, dz)
            taps.norm_sq[id(layer.kernel)] = weight_sq
            if layer.bias is not None:
                taps.norm_sq[id(layer.bias)] = bias_sq
            return dz
        return tf.identity(z), grad
    return identity(z)


# --------------------------------------------------------------------------- the vmap method

def _vmap_norms(model, x, y, sample_weight, variables):
    """(B, n) per-example gradient norms of ``variables`` (trainable variables of ``model``)."""
    trainable = model.trainable_variables
    non_trainable = model.non_trainable_variables
    values = [tf.convert_to_tensor(v.value) for v in trainable]
    frozen = [tf.convert_to_tensor(v.value) for v in non_trainable]
    wanted = [next(i for i, t in enumerate(trainable) if t is v) for v in variables]
    add_batch = lambda t: tf.nest.map_structure(lambda u: tf.expand_dims(u, 0), t)  # noqa: E731

    def one(example):
        xi, yi, wi = example if sample_weight is not None else (*example, None)
        xi, yi = add_batch(xi), add_batch(yi)
        wi = None if wi is None else add_batch(wi)
        with tf.GradientTape() as tape:
            tape.watch(values)
            y_pred, _ = model.stateless_call(values, frozen, xi, training=True)
            loss = model.compute_loss(x=xi, y=yi, y_pred=y_pred, sample_weight=wi, training=True)
        grads = tape.gradient(loss, [values[i] for i in wanted], unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.stack([tf.sqrt(_sq(tf.expand_dims(g, 0))[0]) for g in grads])

    elems = (x, y) if sample_weight is None else (x, y, sample_weight)
    return tf.vectorized_map(one, elems, fallback_to_while_loop=True)


# --------------------------------------------------------------------------- the train step

def _clars_of(optimizer):
    """The CLARS optimizer inside ``optimizer`` (itself, or inside a LossScaleOptimizer), or None."""
    return find_inner(optimizer, "_lb_clars")


class _Source:
    """What CLARS reads in ``apply``: the local Σ_i ‖∇_l f_i‖ per variable and the batch size."""

    def __init__(self, model, data, method, scale):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self.model, self.x, self.y, self.sample_weight = model, x, y, sample_weight
        self.batch = tf.shape(tf.nest.flatten(x)[0])[0]
        self.method, self.scale = method, scale
        self.taps = None

    def norm_sums(self, variables):
        """Per-variable local sums (float32 vector, in the order of ``variables``) and the local
        batch size (float32); called by CLARS while Keras applies the step."""
        batch = tf.cast(self.batch, tf.float32)
        taps = self.taps
        if taps is not None:
            reason = None
            if taps.shared():
                reason = f"layer {taps.shared()[0]!r} was called more than once in the forward pass"
            elif taps.unreached():
                reason = f"layer {taps.unreached()[0]!r} was not called in the forward pass"
            elif any(id(v) not in taps.norm_sq for v in variables):
                reason = "the train step's gradient did not reach every tapped layer"
            if reason is None:
                factor = batch / tf.cast(self.scale, tf.float32)       # g_i = B·∂L/∂z_i, loss scale undone
                sums = [tf.reduce_sum(tf.sqrt(taps.norm_sq[id(v)])) * factor for v in variables]
                return tf.stack(sums), batch
            if self.method == "hooks":
                raise ValueError(f"method='hooks': {reason}; use method='vmap'")
        norms = _vmap_norms(self.model, self.x, self.y, self.sample_weight, variables)
        return tf.reduce_sum(norms, axis=0), batch


def _clars_train_step(model, data):
    optimizer = _clars_of(model.optimizer)
    if optimizer is None:
        raise ValueError("enable_clars: the model's optimizer is not largebatch.keras.CLARS "
                         f"(got {type(model.optimizer).__name__}); compile with "
                         "optimizer=largebatch.keras.CLARS(...) (or DistributedOptimizer(CLARS(...)))")
    method = model._lb_clars_method
    scale = model.optimizer.scale_loss(tf.constant(1.0, tf.float32))
    source = _Source(model, data, method, scale)
    reason = None if method == "vmap" else hooks_unsupported(model)
    if method == "hooks" and reason:
        raise ValueError(f"method='hooks': {reason}; use method='vmap'")
    if reason is None and method != "vmap":
        source.taps = _Taps([layer for layer in _sublayers(model) if _own_trainable(layer)])
        source.taps.install()
    optimizer._lb_norm_source = source
    try:
        return type(model).train_step(model, data)
    finally:
        optimizer._lb_norm_source = None
        if source.taps is not None:
            source.taps.remove()


def enable_clars(model, method="auto"):
    """Give ``model`` (compiled with :class:`largebatch.keras.CLARS`, plain, in
    :func:`~largebatch.keras.DistributedOptimizer` or a ``LossScaleOptimizer``) a train step that
    computes every layer's per-example gradient norms for CLARS inside ``model.fit``'s compiled
    train function. ``method``: ``"hooks"``, ``"vmap"`` or ``"auto"`` (see the module docstring).

    Wraps the model's own ``train_step`` (a subclass's override too: it only has to differentiate
    with a ``tf.GradientTape`` and call ``optimizer.apply_gradients``/``apply``). Call it before or
    after ``compile``; returns ``model``. Compile with ``jit_compile=False``.
    """
    _check_method(method)
    if not isinstance(model, keras.Model):
        raise ValueError(f"model: expected a keras.Model, got {type(model).__name__}")
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"enable_clars: needs the TensorFlow backend, got {keras.backend.backend()!r}")
    model._lb_clars_method = method
    model.train_step = types.MethodType(_clars_train_step, model)
    model.train_function = None               # rebuilt with this step at the next fit
    return model


def per_example_norm_sums(model, x, y, sample_weight=None, *, method="auto"):
    """Σ_i ‖∇_l f_i(w)‖ per trainable variable over this batch (eager or in a ``tf.function``),
    for custom training loops: ``({variable path: 0-d tensor}, batch size)``; pass both to
    :meth:`largebatch.keras.CLARS.set_per_example_norms` (summing across ranks is up to the loop
    then, e.g. one ``hvd.allreduce(op=hvd.Sum)``). The loss is the model's compiled loss; no
    weights or statistics are changed."""
    _check_method(method)
    variables = list(model.trainable_variables)
    reason = None if method == "vmap" else hooks_unsupported(model)
    if method == "hooks" and reason:
        raise ValueError(f"method='hooks': {reason}; use method='vmap'")
    source = _Source(model, (x, y, sample_weight), method, tf.constant(1.0))
    if reason is None and method != "vmap":
        source.taps = _Taps([layer for layer in _sublayers(model) if _own_trainable(layer)])
        source.taps.install()
        try:
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            tape.gradient(loss, variables)
        finally:
            source.taps.remove()
    sums, batch = source.norm_sums(variables)
    return {v.path: s for v, s in zip(variables, tf.unstack(sums))}, batch
