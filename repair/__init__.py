"""repair: post-hoc repair of classifiers that lean on spurious correlations."""
__version__ = "0.1.0"
