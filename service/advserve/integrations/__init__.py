"""Trainer integrations of the in-process engine: `torch` (the differentiable loss), `verl` (advantage
estimators and policy losses in verl's registries), `slime` (a custom advantage function) and
`openrlhf` (OpenRLHF's smallest hook). Each imports its trainer only when it is itself imported.
docs/integrations.md has the details."""
