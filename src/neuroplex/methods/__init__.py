"""Training methods: end-to-end backprop, local learning with auxiliary networks, early exits
and customisation of a trained network."""
