"""Offline capacity planning: model memory math, the parallelism decision tree, Little's Law sizing."""
