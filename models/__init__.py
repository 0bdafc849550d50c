"""Plain nn.Modules: encoders, mesh decoder, camera head, renderer wrappers, refine net."""
