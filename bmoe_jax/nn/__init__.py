"""Pure numerics of the MoE transformer: functions of arrays, safe under jit, vmap, jvp and vjp."""
