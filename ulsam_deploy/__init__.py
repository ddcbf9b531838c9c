"""ulsam-deploy: build, profile, export, verify and benchmark MobileNets with ULSAM."""

__version__ = "0.1.0"
