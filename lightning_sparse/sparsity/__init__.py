"""Pure tensor code for sparsity (no Lightning imports): masks, densities, DST steps, N:M, channels, SAD."""
