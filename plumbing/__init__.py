"""Plumbing: infrastructure the core files import (files, runs, hub, dist, decode, memory, judge HTTP,
reports). Skip this folder on a first read; nothing in it imports a core file."""
