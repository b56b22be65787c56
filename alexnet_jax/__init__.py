"""alexnet-jax: AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) in JAX/Flax."""

from alexnet_jax import cpu_flags

# XLA reads XLA_FLAGS once, when JAX starts its backend: set the CPU option before that happens.
cpu_flags.configure()
