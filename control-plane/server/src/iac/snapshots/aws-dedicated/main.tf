
# Rendered by cellplane from cell-templates/aws for cell "snap-1" (dedicated).
terraform {
  required_version = ">= 1.4"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 6.0"
    }
  }
}

locals {
  # An endpoint override means an AWS emulator: skip what only real AWS answers.
  emulated = var.aws_endpoint != ""
  endpoint = var.aws_endpoint == "" ? null : var.aws_endpoint
  name     = "cellplane-${var.cell_id}"
  tags = merge(var.labels, {
    "cellplane:cell"           = var.cell_id
    "cellplane:tier"           = var.tier
    "cellplane:instance-class" = var.instance_class
    "cellplane:owner"          = var.owner
  })
}

provider "aws" {
  region                      = var.region
  skip_credentials_validation = local.emulated
  skip_requesting_account_id  = local.emulated
  skip_metadata_api_check     = local.emulated
  skip_region_validation      = local.emulated
  s3_use_path_style           = local.emulated

  endpoints {
    ec2            = local.endpoint
    iam            = local.endpoint
    kms            = local.endpoint
    s3             = local.endpoint
    secretsmanager = local.endpoint
    sts            = local.endpoint
  }
}

data "aws_availability_zones" "available" {
  state = "available"
}

resource "aws_vpc" "cell" {
  cidr_block           = var.vpc_cidr
  enable_dns_hostnames = true
  enable_dns_support   = true
  tags                 = merge(local.tags, { Name = local.name })
}

# Two subnets in two availability zones.
resource "aws_subnet" "cell" {
  count             = 2
  vpc_id            = aws_vpc.cell.id
  cidr_block        = cidrsubnet(var.vpc_cidr, 24 - tonumber(split("/", var.vpc_cidr)[1]), count.index)
  availability_zone = data.aws_availability_zones.available.names[count.index]
  tags              = merge(local.tags, { Name = "${local.name}-${count.index}" })
}

resource "aws_security_group" "cell" {
  name        = "${local.name}-app"
  description = "HTTPS into cell ${var.cell_id}"
  vpc_id      = aws_vpc.cell.id
  tags        = local.tags

  ingress {
    description = "HTTPS"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = var.allowed_cidrs
  }

  egress {
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_kms_key" "cell" {
  description             = "Data key of cell ${var.cell_id}"
  deletion_window_in_days = var.kms_deletion_window_days
  enable_key_rotation     = true
  tags                    = local.tags
}

resource "aws_kms_alias" "cell" {
  name          = "alias/cellplane/${var.cell_id}"
  target_key_id = aws_kms_key.cell.key_id
}

# The cell's object store: the bucket named by the resource mapping (shared by the pooled
# cell's tenants under prefixes, or a dedicated tenant's own), encrypted and versioned.
resource "aws_s3_bucket" "data" {
  bucket        = var.resource_mapping["bucket"]
  force_destroy = true
  tags          = local.tags
}

resource "aws_s3_bucket_versioning" "data" {
  bucket = aws_s3_bucket.data.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.cell.arn
    }
  }
}

resource "aws_secretsmanager_secret" "app" {
  name                    = "cellplane/${var.cell_id}/app"
  description             = "Application secrets of cell ${var.cell_id}"
  kms_key_id              = aws_kms_key.cell.arn
  recovery_window_in_days = 0
  tags                    = local.tags
}

resource "aws_iam_role" "cell" {
  name = local.name
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Action    = "sts:AssumeRole"
      Principal = { Service = "ec2.amazonaws.com" }
    }]
  })
  tags = local.tags
}

resource "aws_iam_role_policy" "cell" {
  name = "${local.name}-data"
  role = aws_iam_role.cell.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Effect   = "Allow"
        Action   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"]
        Resource = [aws_s3_bucket.data.arn, "${aws_s3_bucket.data.arn}/*"]
      },
      {
        Effect   = "Allow"
        Action   = ["kms:Decrypt", "kms:GenerateDataKey"]
        Resource = [aws_kms_key.cell.arn]
      },
      {
        Effect   = "Allow"
        Action   = ["secretsmanager:GetSecretValue"]
        Resource = [aws_secretsmanager_secret.app.arn]
      },
    ]
  })
}

output "endpoint" {
  description = "Where the cell's application is reached"
  value       = "https://${var.cell_id}.${var.region}.${var.endpoint_domain}"
}

output "vpc_id" {
  value = aws_vpc.cell.id
}

output "subnet_ids" {
  value = aws_subnet.cell[*].id
}

output "security_group_id" {
  value = aws_security_group.cell.id
}

output "bucket" {
  value = aws_s3_bucket.data.bucket
}

output "kms_key_arn" {
  value = aws_kms_key.cell.arn
}

output "kms_alias" {
  value = aws_kms_alias.cell.name
}

# Sensitive: kept by cellplane as a secret of the cell, never returned by its API.
output "secret_arn" {
  value     = aws_secretsmanager_secret.app.arn
  sensitive = true
}

output "role_arn" {
  value = aws_iam_role.cell.arn
}
