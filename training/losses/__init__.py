"""Training losses of the one-step SR methods: VSD and its timestep samplers, TADSR's blurred MSE, the latent and pixel
discriminators, CODSR's token-attention loss. The perceptual distances live in ``training.perceptual``; RCOD's MEM
regression (L1 between M̂_L and M_L, SPEC §6.4) is ``osd_core.mem.mem_loss``, next to the module it trains."""
