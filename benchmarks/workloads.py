"""What `make bench` runs, named once: batch sizes, training subsets, the model's FLOPs, client
counts and the rows' names (benchmarks/run.py measures them, benchmarks/report.py writes them)."""

FORWARD_MFLOP = 38.2        # per image: convs 36.5 + linears 1.6 (multiply-adds x 2)
TRAIN_MFLOP = 3 * FORWARD_MFLOP   # forward + backward (about twice the forward)
BATCH_SIZES = (1, 8, 32, 128, 256)
# Training runs: one epoch on a subset of the training set (ours needs >= 100 steps of the default
# batch so that its kernel probe runs; the textbook pipeline is slow, so it gets fewer images).
OURS_TRAIN_IMAGES = 25600
TEXTBOOK_TRAIN_IMAGES = 6400
TEXTBOOK_WORKERS, TEXTBOOK_BATCH = 2, 128
MNIST_TRAIN_IMAGES = 60000
SERVE_CLIENTS = (1, 16)            # wrk keep-alive connections: one client, and many
MANY_CLIENTS = max(SERVE_CLIENTS)

TEXTBOOK = (f"textbook: per-image PIL transforms, DataLoader {TEXTBOOK_WORKERS} workers, "
            f"batch {TEXTBOOK_BATCH}, fp32")
DEFAULT = "ours, default: kernels measured at start"
