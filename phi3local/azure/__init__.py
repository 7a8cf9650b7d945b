"""Hand models to Azure: uploads to Blob Storage (`blob_upload`) and Azure ML helpers.

The Azure SDKs live in their own virtual environment (they clash with the training dependencies), so
this package imports nothing heavy at import time: import the submodule you need.
"""
