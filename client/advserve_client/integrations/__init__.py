"""Drop-in wrappers for trainers: `advserve_client.integrations.torch` (a `torch.autograd.Function` whose
loss tensor's `.backward()` applies the service's exact gradients) and `advserve_client.integrations.jax`
(the same as a `jax.custom_vjp` function). Each imports its framework only when it is itself imported:
the client installs and imports without torch or jax. docs/integrations.md has the details."""
