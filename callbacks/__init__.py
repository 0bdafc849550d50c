"""Lightning callbacks: progress lines, TensorBoard images and meshes, timing, guards."""
