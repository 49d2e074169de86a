"""Deployment: certificates, the TLS fleet gateway, the long-running client executor, and the
coordinator (``fedpeft server``) and device (``fedpeft client``) commands."""
