# imagefs_install_configured(TEMPLATE NAME DESTINATION [PROGRAM])
# Installs TEMPLATE as DESTINATION/NAME with @IMAGEFSD@ replaced by the installed daemon's absolute
# path. Both are decided at install time (see install_paths.cmake.in); DESTINATION may be
# "${imagefs_helper_dir}" (escaped, "\${imagefs_helper_dir}") for the mount helpers' directory.
set(IMAGEFS_MOUNT_HELPER_DIR "" CACHE STRING
    "Directory for the mount(8) helpers (empty: /sbin for the prefixes /usr and /usr/local, else PREFIX/sbin)")
configure_file(${CMAKE_CURRENT_LIST_DIR}/install_paths.cmake.in
               ${PROJECT_BINARY_DIR}/imagefs_install_paths.cmake @ONLY)

function(imagefs_install_configured template name destination)
  set(mode FILE)
  if("PROGRAM" IN_LIST ARGN)
    set(mode PROGRAM)
  endif()
  install(CODE "include(\"${PROJECT_BINARY_DIR}/imagefs_install_paths.cmake\")
imagefs_install_configured(\"${template}\" \"${name}\" \"${destination}\" ${mode})")
endfunction()
