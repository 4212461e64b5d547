"""What trials and `txlab train` share to run on a device: resolving it, the optimizer, progress lines."""
