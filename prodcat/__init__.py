"""The `prodcat` command and the local stack it runs the demo and benchmark on."""
