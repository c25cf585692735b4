"""How a step runs: samplers and schedules (diffusers' and k-diffusion's), the sigma-space loop, noise, flow-matching loops."""
