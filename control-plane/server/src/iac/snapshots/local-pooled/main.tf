
# Rendered by cellplane from cell-templates/local for cell "snap-1".
terraform {
  required_version = ">= 1.4"
}

locals {
  pid_file = "${var.cell_dir}/sample-cell.pid"
  log_file = "${var.cell_dir}/sample-cell.log"
  data_dir = "${var.cell_dir}/data"
}

# Stops whatever process the pid file names when the cell is destroyed, even if the
# process resource was left tainted (an interrupted or failed start), whose own destroy
# provisioner terraform does not run. Created first, so destroyed last.
resource "terraform_data" "reaper" {
  input = {
    pid_file   = local.pid_file
    script_dir = abspath(path.module)
  }

  provisioner "local-exec" {
    when    = destroy
    command = "sh \"$SCRIPT_DIR/stop.sh\""
    environment = {
      PID_FILE   = self.input.pid_file
      SCRIPT_DIR = self.input.script_dir
    }
  }
}

# One sample-cell process. A new app_version or release variable replaces it (the destroy
# provisioner stops the old process, then the create provisioner starts the new one).
resource "terraform_data" "process" {
  depends_on = [terraform_data.reaper]

  triggers_replace = {
    app_version      = var.app_version
    port             = var.port
    fault_rate       = var.fault_rate
    extra_latency_ms = var.extra_latency_ms
    instance_class   = var.instance_class
    binary           = var.sample_cell_bin
  }

  # Destroy-time provisioners may only read self: what stop.sh needs lives here.
  input = {
    pid_file   = local.pid_file
    script_dir = abspath(path.module)
  }

  provisioner "local-exec" {
    command = "sh ./start.sh"
    environment = {
      SAMPLE_CELL_BIN  = var.sample_cell_bin
      CELL_ID          = var.cell_id
      PORT             = var.port
      APP_VERSION      = var.app_version
      DATA_DIR         = local.data_dir
      PID_FILE         = local.pid_file
      LOG_FILE         = local.log_file
      ADMIN_TOKEN      = nonsensitive(var.admin_token)
      FAULT_RATE       = var.fault_rate
      EXTRA_LATENCY_MS = var.extra_latency_ms
      BOOT_DELAY_SECS  = var.boot_delay_secs
      INSTANCE_CLASS   = var.instance_class
      CELL_OWNER       = var.owner
    }
  }

  provisioner "local-exec" {
    when    = destroy
    command = "sh \"$SCRIPT_DIR/stop.sh\""
    environment = {
      PID_FILE   = self.input.pid_file
      SCRIPT_DIR = self.input.script_dir
    }
  }
}

output "endpoint" {
  description = "Base URL of the cell's sample-cell process"
  value       = "http://127.0.0.1:${var.port}"
}

output "port" {
  value = var.port
}

output "instance_class" {
  value = var.instance_class
}

output "owner" {
  value = var.owner
}
