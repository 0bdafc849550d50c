"""torchmetrics metrics of the two evaluation protocols (gt-visible amodal mIoU, detect)."""
