"""phi3local: fine-tune Microsoft's Phi-3 models on one workstation and hand them to Azure."""

__version__ = "0.1.0"
