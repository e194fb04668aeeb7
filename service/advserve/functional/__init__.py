"""Pure torch math: tensors in, tensors out, no I/O, no validation beyond shapes.

One module per family: `masks` (masked reductions, whitening, aggregation weights), `scan`
(reward-to-go and GAE as chunked scans), `groups` (segment statistics and group baselines), `kl`
(KL estimators and their gradients), `losses` (per-token policy and value losses with analytic
gradients). Shapes are written [B] (one per response) and [B, T] (one per token).
"""
