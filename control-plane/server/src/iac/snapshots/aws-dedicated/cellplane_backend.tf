# State lives in PostgreSQL; cellplane passes the connection and schema
# through PG_CONN_STR and PG_SCHEMA_NAME.
terraform {
  backend "pg" {}
}
