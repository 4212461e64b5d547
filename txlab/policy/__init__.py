"""Memory policies applied to a built model from outside, in one place (`apply.apply_policy`): the
attention kernel, activation recomputation (`remat`), the loss (`loss`), and the planner's pure
optimisation of what to recompute for a budget (`planner`)."""
