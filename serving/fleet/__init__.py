"""Several TorchServe replicas behind nginx: the layout (topology), supervisord and rollouts (fleet),
nginx's config (frontdoor), the fleet's state and key renewal (rotation), and a pod's key hop (keyhop).
`python -m serving.fleet` is the command. Nothing that ships in the archive or a client imports this."""
