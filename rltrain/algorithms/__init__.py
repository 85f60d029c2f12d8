"""Pure loss and advantage math: functions of tensors, no models or configs."""
