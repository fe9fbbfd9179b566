"""Deployment helpers: render the gateway config and run replicas + nginx on 127.0.0.1."""
